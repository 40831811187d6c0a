"""Live tracking: each round's metrics row as TensorBoard scalars and images under ``<run>/tensorboard/``.

``metrics.jsonl`` stays the record. The event files are a second view of the very rows written
there (this module reads nothing else, bar the PNG grids a row names), so TensorBoard, the
reports and the round log can never tell different stories. ``tensorboard --logdir runs/``
shows every run beside the others.

Layout: ``tensorboard/server`` holds the run's own figures (the global model's, or the mean over
the clients' own models); ``tensorboard/client-<partition id>`` holds a client's where the row
has them (ULatDec, UDec and CollaFuse clients score their own models). The same tags in each,
so TensorBoard draws the server and the clients in one chart.

A resume rewrites ``metrics.jsonl`` to its checkpoint's rows. The tracker follows without being
told: the first row a process writes into a run directory that already holds event files makes
it :meth:`Tracker.replay` the earlier rows of ``metrics.jsonl`` into fresh files (the old ones
removed), then the run appends as before. Each round is one step whatever reads the files
(a centralized baseline's resume too), and the new files open with ``purge_step=1``, so a
TensorBoard that had already read the old ones drops what it held.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from logging import WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from fedapp.config import FedConfig
from fedapp.eval.frechet import QUALITY_NAMES
from fedapp.log import log
from fedapp.runs.rundir import read_jsonl

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

TRACKING_DIR = "tensorboard"
SERVER = "server"
LOSS_TAGS = {"train-loss": "loss/train", "eval-loss": "loss/eval"}
# Quality entries that say what a score was measured on, not a score.
QUALITY_DETAILS = frozenset({"samples", "sampler", "anchors", "clients"})


def client_dir(partition_id: str | int) -> str:
    return f"client-{partition_id}"


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def phase_scalars(phase: str, metrics: Mapping[str, Any]) -> dict[str, float]:
    """A train or evaluate entry as tags: the losses under ``loss/``, Fréchet scores under ``quality/``."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        number = _number(value)
        if number is None:
            continue
        if key in LOSS_TAGS:
            out[LOSS_TAGS[key]] = number
        elif key.removesuffix("-std") in QUALITY_NAMES:
            out[f"quality/{key}"] = number
        else:
            out[f"{phase}/{key}"] = number
    return out


def quality_scalars(quality: Mapping[str, Any]) -> dict[str, float]:
    """Scores (with their std over clients, precision and recall) and the noise and real anchors."""
    out = {f"quality/{k}": n for k, v in quality.items()
           if k not in QUALITY_DETAILS and (n := _number(v)) is not None}
    for metric, anchors in (quality.get("anchors") or {}).items():
        for anchor, value in anchors.items():
            if (number := _number(value)) is not None:
                out[f"quality/{metric}-{anchor}"] = number
    return out


def comm_scalars(comm: Mapping[str, Any]) -> dict[str, float]:
    """Bytes on the wire, summed over message types: this round's and so far (the round log's figure)."""
    totals = {"round": {"down_wire": 0.0, "up_wire": 0.0}, "cumulative": {"down_wire": 0.0, "up_wire": 0.0}}
    seen = False
    for mtype, entry in comm.items():
        if mtype == "per_client" or not isinstance(entry, Mapping):
            continue
        for span, sums in totals.items():
            for key in sums:
                sums[key] += float(entry.get(span, {}).get(key, 0))
                seen = True
    if not seen:
        return {}
    rnd, cum = totals["round"], totals["cumulative"]
    return {"comm/bytes-so-far": cum["down_wire"] + cum["up_wire"],
            "comm/bytes-per-round": rnd["down_wire"] + rnd["up_wire"],
            "comm/down-bytes-so-far": cum["down_wire"], "comm/up-bytes-so-far": cum["up_wire"]}


def row_scalars(row: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Every scalar a row holds, by writer (``server``, ``client-<pid>``) and tag."""
    server = {**phase_scalars("train", row.get("train", {})), **phase_scalars("evaluate", row.get("evaluate", {})),
              **quality_scalars(row.get("quality", {})), **comm_scalars(row.get("comm", {}))}
    for key in ("round_s", "wall_s"):
        if (number := _number(row.get(key))) is not None:
            server[f"time/{key.replace('_', '-')}"] = number
    out: dict[str, dict[str, float]] = {SERVER: server}
    collafuse = row.get("collafuse", {})
    for key, value in collafuse.items():
        if (number := _number(value)) is not None:
            server[f"collafuse/{key}"] = number
    for key, value in collafuse.get("client-share", {}).items():
        if (number := _number(value)) is not None:
            server[f"collafuse/client-share-{key}"] = number
    for pid, counters in collafuse.get("clients", {}).items():
        out.setdefault(client_dir(pid), {}).update(
            {f"collafuse/{k}": n for k, v in counters.items() if (n := _number(v)) is not None})
    for pid, phases in row.get("per_client", {}).items():
        scalars = out.setdefault(client_dir(pid), {})
        for phase in ("train", "evaluate"):
            scalars.update(phase_scalars(phase, phases.get(phase, {})))
    return out


def row_images(row: Mapping[str, Any]) -> dict[str, str]:
    """The sample grids a row names, by writer, as paths relative to the run directory."""
    out = {SERVER: row["samples"]} if isinstance(row.get("samples"), str) else {}
    for pid, path in row.get("client_samples", {}).items():
        out[client_dir(pid)] = path
    return out


def _read_png(path: Path) -> np.ndarray | None:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as err:
        log(WARNING, "tracking: sample grid %s not added (%s)", path, err)
        return None


class Tracker:
    """TensorBoard writers of one run directory, fed one metrics row at a time (a no-op when off)."""

    def __init__(self, run_path: Path, enabled: bool = True) -> None:
        self.run_path = Path(run_path)
        self.root = self.run_path / TRACKING_DIR
        self.enabled = enabled
        self.writers: dict[str, SummaryWriter] = {}
        self.purge_step: int | None = None
        self.synced = False  # whether this process has checked the files against metrics.jsonl
        self.origin = time.time()  # what a row's ``wall_s`` counts from

    @classmethod
    def for_run(cls, run_path: Path, cfg: FedConfig) -> Tracker:
        return cls(run_path, enabled=cfg.output.tensorboard)

    def _writer(self, name: str) -> SummaryWriter:
        if name not in self.writers:
            # tensorboard's import is only paid when tracking
            from torch.utils.tensorboard import SummaryWriter

            self.writers[name] = SummaryWriter(str(self.root / name), purge_step=self.purge_step, flush_secs=30)
        return self.writers[name]

    def write(self, row: Mapping[str, Any]) -> None:
        """One round: its scalars and grids at step ``row["round"]``, flushed so TensorBoard sees them now."""
        if not self.enabled:
            return
        step = int(row["round"])
        if not self.synced:
            self.synced = True
            if self._has_events():  # a resumed run: the files become metrics.jsonl's earlier rows first
                metrics = self.run_path / "metrics.jsonl"
                earlier = [r for r in read_jsonl(metrics) if int(r["round"]) < step] if metrics.is_file() else []
                self.replay(earlier, upto=row)
        walltime = self.origin + float(row.get("wall_s", time.time() - self.origin))
        touched: set[str] = set()
        for name, scalars in row_scalars(row).items():
            writer = self._writer(name)
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, step, walltime=walltime)
            touched.add(name)
        for name, rel in row_images(row).items():
            image = _read_png(self.run_path / rel)
            if image is not None:
                self._writer(name).add_image("samples", image, step, walltime=walltime, dataformats="HWC")
                touched.add(name)
        for name in touched:
            self.writers[name].flush()

    def _has_events(self) -> bool:
        return self.root.is_dir() and any(self.root.glob("**/events.out.tfevents.*"))

    def replay(self, rows: Iterable[Mapping[str, Any]], upto: Mapping[str, Any] | None = None) -> None:
        """The event files become exactly ``rows``, as ``metrics.jsonl`` does on a resume.

        ``upto``: the row about to be written after them; its ``wall_s`` places the replayed rows in time.
        """
        if not self.enabled:
            return
        rows = list(rows)
        self.close()
        for path in self.root.glob("**/events.out.tfevents.*") if self.root.is_dir() else ():
            path.unlink()
        self.purge_step, self.synced = 1, True
        last = upto if upto is not None else (rows[-1] if rows else {})
        self.origin = time.time() - float(last.get("wall_s", 0.0))
        for row in rows:
            self.write(row)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()
