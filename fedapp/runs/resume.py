"""Continue a run from its last complete round.

After every round the server checkpoints (atomically) the global model, the strategy's
state, the RNG states, the communication ledger and the metrics rows. A resume reads the
newest round checkpoint, checks that the new config trains the same thing, and puts the
run directory's logs back to exactly that round, so each round appears once.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedapp.config import ConfigError, FedConfig, flatten
from fedapp.protocol.keys import STATE_RUN
from fedapp.runs.checkpoint import load_checkpoint
from fedapp.runs.rundir import RunDir

# Keys a resumed run may change: how long and how it runs, not what it trains.
MAY_CHANGE = ("train.rounds", "strategy.round-timeout", "strategy.node-timeout", "output.resume",
              "output.progress", "faults.")
_ROUND_FILE = re.compile(r"^round-(\d+)\.pt$")


@dataclass(frozen=True)
class ResumePoint:
    """Everything a resumed server starts from: the checkpoint of round ``round`` and its extras."""

    run: RunDir
    checkpoint: Path
    round: int
    model: dict[str, torch.Tensor]
    extra: dict[str, Any]
    ema: dict[str, Any] | None = None  # the server's EMA of the global model, when it keeps one

    @property
    def state_run(self) -> int:
        """The run id the nodes keep their state under: the first run's, whatever resumes it."""
        return int(self.extra.get(STATE_RUN, 0))


def rng_state() -> dict[str, Any]:
    """The server process's generators: Flower samples nodes with ``random``, sampling uses torch."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has-gauss": int(has_gauss), "gauss": float(gauss)}}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has-gauss"], n["gauss"]))


def latest_checkpoint(run: Path) -> tuple[int, Path]:
    """The newest ``checkpoints/round-NNN.pt`` of a run directory."""
    found = sorted((int(m.group(1)), p) for p in (run / "checkpoints").glob("round-*.pt")
                   if (m := _ROUND_FILE.match(p.name)))
    if not found:
        raise FileNotFoundError(f"{run} has no round checkpoint (checkpoints/round-NNN.pt) to resume from")
    return found[-1]


def config_difference(old: FedConfig, new: FedConfig) -> str | None:
    """The first key, other than the MAY_CHANGE ones, on which two configs differ, as one line."""
    before, after = flatten(old.model_dump(by_alias=True)), flatten(new.model_dump(by_alias=True))
    for key in sorted(before.keys() | after.keys()):
        if key.startswith(MAY_CHANGE) or before.get(key) == after.get(key):
            continue
        return f"{key} = {after.get(key)!r}, but the run was trained with {before.get(key)!r}"
    return None


def load_resume_point(cfg: FedConfig) -> ResumePoint:
    """The run ``output.resume`` names, at its newest checkpoint; ConfigError says why it cannot resume."""
    path = Path(cfg.output.resume).expanduser().resolve()
    if not (path / "config.toml").is_file():
        raise ConfigError(f"output.resume = {cfg.output.resume!r} is not a run directory (no config.toml)")
    try:
        done, checkpoint = latest_checkpoint(path)
        _, saved, payload = load_checkpoint(checkpoint)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"cannot resume: {err}") from None
    extra = payload["extra"]
    if int(payload["round"]) != done or "rng" not in extra or "strategy" not in extra:
        raise ConfigError(f"cannot resume: {checkpoint} lacks the state a resume needs (round, rng, strategy)")
    difference = config_difference(saved, cfg)
    if difference:
        raise ConfigError(f"cannot resume {path.name}: {difference}")
    if cfg.train.rounds <= done:
        raise ConfigError(f"nothing to resume: {path.name} has finished round {done} of train.rounds = "
                          f"{cfg.train.rounds}; raise train.rounds to train on")
    return ResumePoint(RunDir(path), checkpoint, done, payload["model"], extra, payload.get("ema"))
