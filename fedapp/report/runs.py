"""The runs a report reads: what the app wrote into each run directory, and the series drawn from it.

Missing data shows as "—" with a note, never as a crash, so finished runs, runs still going and
runs of older versions can be put side by side.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from fedapp.files import one_line
from fedapp.runs.rundir import audit_path, read_jsonl

DASH = "—"
BASELINE = "centralized"
PER_ROW = 4  # sample-grid panels per figure row
DPI = 120
PAPER_NAMES = {"full": "Full", "usplit": "USplit", "ulatdec": "ULatDec", "udec": "UDec", "collafuse": "CollaFuse"}


class Metric(NamedTuple):
    key: str
    section: str
    title: str


METRICS: tuple[Metric, ...] = (
    Metric("fd-cnn", "quality", "FD-CNN (own Fashion-MNIST classifier features; not Inception FID)"),
    Metric("fid", "quality", "FID (Inception)"),
    Metric("eval-loss", "evaluate", "eval loss (denoising loss on held-out images)"),
    Metric("fd-cnn-class-tvd", "quality",
           "class TVD (total variation distance of the samples' class mix to the reference split's)"),
)
"""What the quality figures show; FD-CNN keeps its own name so nobody reads it as an Inception FID."""


class Point(NamedTuple):
    round: int
    value: float
    std: float | None


class CommPoint(NamedTuple):
    round: int
    params: float
    bytes: float


@dataclass(frozen=True)
class Run:
    name: str
    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]

    def setting(self, section: str, key: str, default: Any = None) -> Any:
        value = dig(self.config, section, key)
        return default if value is None else value

    @property
    def method(self) -> str:
        return str(self.setting("strategy", "name", "?"))

    @property
    def partitioner(self) -> str:
        return str(self.setting("data", "partitioner", "?"))

    @property
    def is_baseline(self) -> bool:
        return self.method == BASELINE

    @property
    def method_label(self) -> str:
        return f"{BASELINE} (baseline)" if self.is_baseline else self.method

    @property
    def cut_ratio(self) -> float | None:
        """CollaFuse's c, which sets a run apart as much as its method does; None for the other methods."""
        return num(self.setting("collafuse", "cut-ratio")) if self.method == "collafuse" else None

    @property
    def label(self) -> str:
        """Legend and panel text: the baseline has no partition, the others are told apart by theirs
        (and CollaFuse's runs by their cut ratio)."""
        if self.is_baseline:
            return self.method_label
        cut = "" if self.cut_ratio is None else f" · c = {self.cut_ratio:g}"
        return f"{self.method} · {self.partitioner}{cut}"


# ---------------------------------------------------------------- reading


def dig(obj: Any, *keys: str) -> Any:
    """A nested value, or None where any level is missing or not a table (old or partial rows)."""
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except (OSError, ValueError) as err:  # TOMLDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path}: unreadable config ({one_line(err)})") from None


def _bad_line(path: Path) -> int | None:
    """The first line read_jsonl chokes on, so the error can point at it."""
    import json

    with path.open(errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                return number
            if not isinstance(row, dict):
                return number
    return None


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    try:
        rows = read_jsonl(path)
    except (OSError, ValueError) as err:
        line = _bad_line(path) if not isinstance(err, OSError) else None
        where = f"{path}:{line}" if line else str(path)
        raise ValueError(f"{where}: unreadable metrics line ({one_line(err)})") from None
    if not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"{path}:{_bad_line(path)}: a metrics line is not a JSON object")
    return rows


RUN_KEYS: tuple[tuple[str, str, type], ...] = (("strategy", "name", str), ("data", "name", str),
                                               ("train", "rounds", int))
"""What every fedapp run's config.toml names, old versions' too; a TOML file without them is someone else's."""


def load_run(path: Path) -> Run:
    """A run directory holds the ``config.toml`` the ServerApp writes and the ``metrics.jsonl`` of its rounds.

    Anything else is refused here, with the reason, rather than reported as a column of "?": a folder
    with some other ``config.toml``, or a run that has not finished its first round yet.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run directory")
    if not path.is_dir() or not (path / "config.toml").is_file():
        raise ValueError(f"{path} is not a run directory (no config.toml)")
    config = _read_config(path / "config.toml")
    missing = [f"{section}.{key}" for section, key, kind in RUN_KEYS
               if not isinstance(dig(config, section, key), kind)]
    if missing:
        raise ValueError(f"{path} is not a run directory: its config.toml is not a fedapp run's "
                         f"(no {', '.join(missing)})")
    if not (path / "metrics.jsonl").is_file():
        raise ValueError(f"{path} is not a run directory with a finished round (no metrics.jsonl)")
    return Run(path.resolve().name, path, config, _read_rows(path / "metrics.jsonl"))


def load_runs(paths: Sequence[Path]) -> list[Run]:
    """Baseline first (the table's order everywhere); repeated names get a suffix so files don't clash."""
    runs: list[Run] = []
    seen: dict[str, int] = {}
    for path in paths:
        run = load_run(path)
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run = replace(run, name=f"{run.name}-{seen[run.name]}")
        runs.append(run)
    return sorted(runs, key=lambda r: not r.is_baseline)


# ---------------------------------------------------------------- extracting


def series(run: Run, metric: Metric) -> list[Point]:
    points = []
    for row in run.rows:
        rnd, value = num(row.get("round")), num(dig(row, metric.section, metric.key))
        if rnd is not None and value is not None:
            points.append(Point(int(rnd), value, num(dig(row, metric.section, f"{metric.key}-std"))))
    return points


def _phase_traffic(row: dict[str, Any], phase: str) -> tuple[float, float] | None:
    """A row's cumulative (values, bytes), down + up, over the phase's message types.

    A phase is Flower's message type, ``train`` or ``evaluate``, and the named actions under it:
    CollaFuse's traffic is ``train.collafuse`` and ``evaluate.collafuse``. None where the row has none.
    """
    comm = dig(row, "comm")
    found = None
    for mtype, entry in (comm.items() if isinstance(comm, dict) else ()):
        if mtype != phase and not mtype.startswith(f"{phase}."):
            continue
        params = [num(dig(entry, "cumulative", f"{d}_params")) for d in ("down", "up")]
        if None in params:
            continue
        size = sum(num(dig(entry, "cumulative", f"{d}_bytes")) or 0.0 for d in ("down", "up"))
        values, total = found or (0.0, 0.0)
        found = (values + sum(params), total + size)  # type: ignore[arg-type]
    return found


def comm_series(run: Run) -> list[CommPoint]:
    """Cumulative training traffic (down + up); evaluation traffic is reported on its own."""
    points = []
    for row in run.rows:
        rnd, traffic = num(row.get("round")), _phase_traffic(row, "train")
        if rnd is not None and traffic is not None:
            points.append(CommPoint(int(rnd), *traffic))
    return points


def eval_traffic(run: Run) -> CommPoint | None:
    for row in reversed(run.rows):
        traffic = _phase_traffic(row, "evaluate")
        if traffic is not None:
            return CommPoint(int(num(row.get("round")) or 0), *traffic)
    return None


def comm_reduction(run: Run, full: Run) -> tuple[float, int] | None:
    """Fraction of the full run's training traffic saved, at the last round both runs reached."""
    theirs = {p.round: p.params for p in comm_series(full)}
    common = [p for p in comm_series(run) if theirs.get(p.round)]
    if not common:
        return None
    last = common[-1]
    return 1.0 - last.params / theirs[last.round], last.round


def full_counterpart(run: Run, runs: Sequence[Run]) -> Run | None:
    if run.method in ("full", BASELINE, "collafuse"):  # CollaFuse sends x_t and ε, not parameters
        return None
    return next((r for r in runs if r.method == "full" and r.partitioner == run.partitioner
                 and comm_series(r)), None)


def last_grid(run: Run) -> tuple[Path, int] | None:
    for row in reversed(run.rows):
        rel = row.get("samples")
        if not isinstance(rel, str):
            continue
        # a run's own folder, or a copy of its results with the grids beside metrics.jsonl (docs/results)
        for grid in (run.path / rel, run.path / Path(rel).name):
            if grid.is_file():
                return grid, int(num(row.get("round")) or 0)
    return None


def read_audit(run: Run) -> dict[str, Any] | None:
    """The membership audit of the run's final model (``fedapp audit``), when one was made and reads."""
    path = audit_path(run.path / "final.pt")
    try:
        audit = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(audit, dict) and isinstance(audit.get("clients"), list) and all(
        isinstance(c, dict) and num(c.get("auc")) is not None and num(c.get("tpr@1%fpr")) is not None
        for c in audit["clients"])
    return audit if ok else None


def clients(run: Run) -> str:
    count = num(run.setting("data", "num-partitions"))
    if count and count > 0:
        return str(int(count))
    per_client = dig(run.rows[-1], "comm", "per_client") if run.rows else None
    if isinstance(per_client, dict) and per_client:
        return str(len(per_client))
    return DASH if run.is_baseline else "?"
