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
from fedapp.protocol.keys import DP_EPSILON, DP_SGD_EPSILON
from fedapp.runs.checkpoint import save_checkpoint
from fedapp.runs.rundir import RunDir
from fedapp.runs.tracking import Tracker

Row = dict[str, Any]
"""``round``, ``round_s``, ``wall_s``, ``train``, ``evaluate``, ``comm``; then optionally
``collafuse``, ``quality``, ``samples``, and where clients own models ``per_client`` (each client's
train and evaluate figures by partition id) and ``client_samples`` (each one's grid); ``checkpoint``
and ``record_s`` when closed."""


class RoundClock:
    """Wall time since the run started and since the last round ended."""

    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()

    def restart(self) -> None:
        self.started = self.last = time.perf_counter()

    def lap(self) -> None:
        """The round's bookkeeping is done: the next round's time starts now."""
        self.last = time.perf_counter()

    def resume(self, rows: list[Row]) -> None:
        """Go on after a checkpoint's ``rows``: the run's wall time counts on from its last row's."""
        self.started = time.perf_counter() - (float(rows[-1]["wall_s"]) if rows else 0.0)
        self.lap()

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


def quality_entry(cfg: FedConfig, scores: dict[str, float],
                  anchors: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """Fréchet scores with what they were measured on (how many samples, which sampler) and the anchors."""
    ev = cfg.eval
    entry = {**scores, "samples": ev.metric_samples, "sampler": f"{ev.sampler}-{ev.sampler_steps}"}
    if anchors:
        entry["anchors"] = anchors
    return entry


def _megabytes(count: float) -> str:
    return f"{count / 1e6:.1f} MB"


def summary_line(row: Row, rounds: int, sent_bytes: int | None = None) -> str:
    """The one line a round leaves in the log: losses, quality beside its anchors, bytes, grid, time."""
    parts = [f"round {row['round']}/{rounds}"]
    for phase, key in (("train", "train-loss"), ("train", "server-train-loss"), ("evaluate", "eval-loss")):
        value = row.get(phase, {}).get(key)
        if isinstance(value, int | float):
            parts.append(f"{key} {value:.4f}")
    quality = row.get("quality", {})
    for name in ("fd-cnn", "fid"):
        if name not in quality:
            continue
        spread = f" ± {quality[f'{name}-std']:.1f} over {int(quality.get('clients', 0))} clients" \
            if f"{name}-std" in quality else ""
        anchors = quality.get("anchors", {}).get(name, {})
        where = ", ".join(f"{k} {v:.1f}" for k, v in anchors.items())
        samples = f"{quality.get('samples')} {quality.get('sampler')} samples"
        parts.append(f"{name.upper()} {quality[name]:.1f}{spread} ({where + '; ' if where else ''}{samples})")
        if name == "fd-cnn" and "fd-cnn-precision" in quality:
            parts.append(f"precision {quality['fd-cnn-precision']:.2f} recall {quality['fd-cnn-recall']:.2f}")
        if name == "fd-cnn" and "fd-cnn-class-tvd" in quality:
            parts.append(f"class TVD {quality['fd-cnn-class-tvd']:.3f}")
    epsilon = row.get("train", {}).get(DP_EPSILON)
    if isinstance(epsilon, int | float):
        parts.append(f"ε {epsilon:.2f} spent")
    sample_epsilon = row.get("train", {}).get(DP_SGD_EPSILON)
    if isinstance(sample_epsilon, int | float):
        parts.append(f"DP-SGD ε {sample_epsilon:.2f} (worst client)")
    if sent_bytes is not None:
        parts.append(f"{_megabytes(sent_bytes)} moved so far")
    if "samples" in row:
        parts.append(f"grid {row['samples']}")
    parts.append(f"{row['round_s']:.1f} s")
    return " | ".join(parts)


def close_round(run: RunDir, cfg: FedConfig, model: nn.Module, rows: list[Row], row: Row,
                now: float, extra: dict[str, Any], ema: dict[str, Any] | None = None,
                tracker: Tracker | None = None) -> None:
    """Checkpoint the round (with every row so far, and the model's EMA), then log its row and keep it in ``rows``.

    ``tracker`` gets the row right after ``metrics.jsonl`` does: the live view shows what the log holds.
    """
    checkpoint = run.checkpoint_path(row["round"])
    row["checkpoint"] = str(checkpoint.relative_to(run.path))
    row["record_s"] = round(time.perf_counter() - now, 3)
    save_checkpoint(checkpoint, cfg, row["round"], model, extra={**extra, "metrics": rows + [row]}, ema=ema)
    rows.append(row)
    run.append_jsonl(run.metrics_path, row)
    if tracker is not None:
        tracker.write(row)
