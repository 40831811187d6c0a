"""The run directory: config, metrics, checkpoints and samples of one run."""

from __future__ import annotations

import json
import os
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fedapp.config import FedConfig
from fedapp.files import atomic_write_text

RUN_DIR_LINE = "fedapp run directory: "  # the ServerApp logs it first; the launchers read the path back


def audit_path(checkpoint: Path) -> Path:
    """Where ``fedapp audit`` writes the attack on ``checkpoint`` (``final.pt``: ``final-audit.json``)."""
    return checkpoint.with_name(f"{checkpoint.stem}-audit.json")


@dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def create(cls, cfg: FedConfig, base: Path | None = None) -> RunDir:
        """A new directory under ``output.dir``; an existing one is never reused."""
        root = (base or Path(cfg.output.dir)).expanduser().resolve()
        name = cfg.output.name or (
            f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.strategy.name}-{cfg.data.name}-{cfg.data.partitioner}"
        )
        root.mkdir(parents=True, exist_ok=True)
        for suffix in [""] + [f"-{i}" for i in range(1, 1000)]:
            path = root / f"{name}{suffix}"
            try:
                path.mkdir()
            except FileExistsError:
                continue
            run = cls(path)
            run.write_config(cfg)
            return run
        raise FileExistsError(f"could not create a fresh run directory for {name!r} under {root}")

    @property
    def config_path(self) -> Path:
        return self.path / "config.toml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def comm_path(self) -> Path:
        return self.path / "comm.jsonl"

    def checkpoint_path(self, server_round: int) -> Path:
        return self.path / "checkpoints" / f"round-{server_round:03d}.pt"

    def samples_path(self, server_round: int) -> Path:
        return self.path / "samples" / f"round-{server_round:03d}.png"

    @property
    def label_plot_path(self) -> Path:
        return self.path / "label-distribution.png"

    def write_config(self, cfg: FedConfig) -> None:
        """The resolved config, as a TOML file ``flwr run --run-config`` accepts back."""
        atomic_write_text(self.config_path, tomli_w.dumps(cfg.model_dump(by_alias=True)))

    def rewrite_jsonl(self, path: Path, rows: list[dict[str, Any]]) -> None:
        """Replace a log with exactly these rows (a resume drops the rounds after its checkpoint)."""
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))

    def append_jsonl(self, path: Path, rows: list[dict[str, Any]] | dict[str, Any]) -> None:
        """Append and flush, so a crash loses at most the row being written."""
        rows = [rows] if isinstance(rows, dict) else rows
        with path.open("a") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with Path(path).open() as handle:
        return [json.loads(line) for line in handle if line.strip()]


def unfinished(run: Path, since: float = 0.0) -> str | None:
    """Why ``run`` did not finish (as one line), or None: every round logged and ``final.pt`` written.

    ``flwr run`` exits 0 whatever became of the run, so the commands that start one ask the run
    directory. ``since`` (a ``time.time()``): a ``final.pt`` older than that is a previous run's.
    """
    try:
        rounds = int(tomllib.loads((run / "config.toml").read_text())["train"]["rounds"])
    except (OSError, KeyError, ValueError, tomllib.TOMLDecodeError) as err:
        return f"{run} holds no readable config.toml ({type(err).__name__})"
    logged = [int(row["round"]) for row in read_jsonl(run / "metrics.jsonl")] if (run / "metrics.jsonl").is_file() else []
    if logged[-1:] != [rounds]:
        return f"{run.name} reached round {max(logged, default=0)} of {rounds}"
    final = run / "final.pt"
    if not final.is_file() or final.stat().st_mtime < since:
        return f"{run.name} logged all {rounds} rounds but wrote no final.pt"
    return None
