"""One metrics row per round: its schema, its clock and how a round is closed.

The federated recorder and the centralized baseline write the same row, so reports and
resume read one format. Closing a round is ordered for crash safety: the checkpoint (which
holds every row so far, this one included) is written before the row is appended to
``metrics.jsonl``, so a run killed at any point resumes with every round logged once.
"""

from __future__ import annotations

import time
from typing import Any

from torch import nn

from fedapp.config import FedConfig
from fedapp.runs.checkpoint import save_checkpoint
from fedapp.runs.rundir import RunDir

Row = dict[str, Any]
"""``round``, ``round_s``, ``wall_s``, ``train``, ``evaluate``, ``comm``; then optionally
``collafuse``, ``quality``, ``samples``; ``checkpoint`` and ``record_s`` when closed."""


class RoundClock:
    """Wall time since the run started and since the last round ended."""

    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()

    def restart(self) -> None:
        self.started = self.last = time.perf_counter()

    def lap(self) -> None:
        """The round's bookkeeping is done: the next round's time starts now."""
        self.last = time.perf_counter()

    def new_row(self, server_round: int, now: float, *, train: dict[str, float],
                evaluate: dict[str, float], comm: dict[str, Any]) -> Row:
        return {
            "round": server_round,
            "round_s": round(now - self.last, 3),
            "wall_s": round(now - self.started, 3),
            "train": train,
            "evaluate": evaluate,
            "comm": comm,
        }


def quality_entry(cfg: FedConfig, scores: dict[str, float]) -> dict[str, Any]:
    """Fréchet scores with what they were measured on: how many samples and which sampler."""
    ev = cfg.eval
    return {**scores, "samples": ev.metric_samples, "sampler": f"{ev.sampler}-{ev.sampler_steps}"}


def close_round(run: RunDir, cfg: FedConfig, model: nn.Module, rows: list[Row], row: Row,
                now: float, extra: dict[str, Any]) -> None:
    """Checkpoint the round (with every row so far), then log its row and keep it in ``rows``."""
    checkpoint = run.checkpoint_path(row["round"])
    row["checkpoint"] = str(checkpoint.relative_to(run.path))
    row["record_s"] = round(time.perf_counter() - now, 3)
    save_checkpoint(checkpoint, cfg, row["round"], model, extra={**extra, "metrics": rows + [row]})
    rows.append(row)
    run.append_jsonl(run.metrics_path, row)
