"""``fedapp report``: one Markdown page with figures that puts several run directories side by side.

Everything is read from what the app writes into a run directory (``config.toml``, ``metrics.jsonl``,
sample grids, ``label-distribution.png``), so a report can be made of finished runs, of runs still
going, and of runs made by older versions: missing data shows as "—" with a note, never as a crash.
"""

from __future__ import annotations

import math
import os
import shutil
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedapp.files import one_line  # noqa: E402
from fedapp.report import reference as ref  # noqa: E402
from fedapp.runs.rundir import read_jsonl  # noqa: E402

DASH = "—"
BASELINE = "centralized"
PER_ROW = 4  # sample-grid panels per figure row
DPI = 120
PAPER_NAMES = {"full": "Full", "usplit": "USplit", "ulatdec": "ULatDec", "udec": "UDec"}


class Metric(NamedTuple):
    key: str
    section: str
    title: str


METRICS: tuple[Metric, ...] = (
    Metric("fd-cnn", "quality", "FD-CNN (own Fashion-MNIST classifier features; not Inception FID)"),
    Metric("fid", "quality", "FID (Inception)"),
    Metric("eval-loss", "evaluate", "eval loss (denoising loss on held-out images)"),
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
        value = _dig(self.config, section, key)
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
    def label(self) -> str:
        """Legend and panel text: the baseline has no partition, the others are told apart by theirs."""
        return self.method_label if self.is_baseline else f"{self.method} · {self.partitioner}"


# ---------------------------------------------------------------- reading


def _dig(obj: Any, *keys: str) -> Any:
    """A nested value, or None where any level is missing or not a table (old or partial rows)."""
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _num(value: Any) -> float | None:
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


def load_run(path: Path) -> Run:
    """A run directory is one with a ``config.toml``; ``metrics.jsonl`` may not exist yet."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run directory")
    if not path.is_dir() or not (path / "config.toml").is_file():
        raise ValueError(f"{path} is not a run directory (no config.toml)")
    config = _read_config(path / "config.toml")
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
        rnd, value = _num(row.get("round")), _num(_dig(row, metric.section, metric.key))
        if rnd is not None and value is not None:
            points.append(Point(int(rnd), value, _num(_dig(row, metric.section, f"{metric.key}-std"))))
    return points


def comm_series(run: Run) -> list[CommPoint]:
    """Cumulative training traffic (down + up); evaluation traffic is reported on its own."""
    points = []
    for row in run.rows:
        cum = _dig(row, "comm", "train", "cumulative")
        rnd = _num(row.get("round"))
        params = [_num(_dig(cum, f"{d}_params")) for d in ("down", "up")]
        size = [_num(_dig(cum, f"{d}_bytes")) for d in ("down", "up")]
        if rnd is not None and None not in params:
            points.append(CommPoint(int(rnd), sum(params), sum(v or 0.0 for v in size)))  # type: ignore[arg-type]
    return points


def eval_traffic(run: Run) -> CommPoint | None:
    for row in reversed(run.rows):
        cum = _dig(row, "comm", "evaluate", "cumulative")
        params = [_num(_dig(cum, f"{d}_params")) for d in ("down", "up")]
        if None not in params:
            size = sum(_num(_dig(cum, f"{d}_bytes")) or 0.0 for d in ("down", "up"))
            return CommPoint(int(_num(row.get("round")) or 0), sum(params), size)  # type: ignore[arg-type]
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
    if run.method in ("full", BASELINE):
        return None
    return next((r for r in runs if r.method == "full" and r.partitioner == run.partitioner
                 and comm_series(r)), None)


def last_grid(run: Run) -> tuple[Path, int] | None:
    for row in reversed(run.rows):
        rel = row.get("samples")
        if isinstance(rel, str) and (run.path / rel).is_file():
            return run.path / rel, int(_num(row.get("round")) or 0)
    return None


def clients(run: Run) -> str:
    count = _num(run.setting("data", "num-partitions"))
    if count and count > 0:
        return str(int(count))
    per_client = _dig(run.rows[-1], "comm", "per_client") if run.rows else None
    if isinstance(per_client, dict) and per_client:
        return str(len(per_client))
    return DASH if run.is_baseline else "?"


# ---------------------------------------------------------------- figures


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_metric(runs: Sequence[Run], metric: Metric, path: Path) -> Path | None:
    """One line per run, with a band where the std over the clients' models is known."""
    curves = [(run, series(run, metric)) for run in runs]
    curves = [(run, points) for run, points in curves if points]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run, points in curves:
        xs = [p.round for p in points]
        ys = [p.value for p in points]
        (line,) = ax.plot(xs, ys, marker="o", ms=4, label=_legend(run, [r for r, _ in curves]))
        if any(p.std is not None for p in points):
            low = [p.value - p.std if p.std is not None else math.nan for p in points]
            high = [p.value + p.std if p.std is not None else math.nan for p in points]
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("round")
    ax.set_ylabel(metric.title if len(metric.title) < 40 else metric.title.split(" (")[0])
    ax.set_title(f"{metric.title}\nlower is better; band: ± std over the clients' models", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_comm(runs: Sequence[Run], path: Path) -> Path | None:
    curves = [(run, comm_series(run)) for run in runs]
    curves = [(run, points) for run, points in curves if points]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run, points in curves:
        ax.plot([p.round for p in points], [p.params / 1e6 for p in points], marker="o", ms=4,
                label=_legend(run, [r for r, _ in curves]))
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative parameters, down + up (millions)")
    ax.set_title("cumulative training communication (evaluation traffic not included)", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_samples(grids: Sequence[tuple[Run, Path, int]], path: Path) -> Path | None:
    """The last grid of every run in one figure, like FedDiffuse's Figure 5."""
    if not grids:
        return None
    cols = min(len(grids), PER_ROW)
    rows = math.ceil(len(grids) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 4.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (run, grid, rnd) in zip(axes.flat, grids):
        image = mpimg.imread(grid)
        gray = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0} if image.ndim == 2 else {}
        ax.imshow(image, interpolation="nearest", **gray)
        where = "all data" if run.is_baseline else run.partitioner
        ax.set_title(f"{run.method} · {where}\n{run.name}, round {rnd}", fontsize=8)
    return _save(fig, path)


def _legend(run: Run, runs: Sequence[Run]) -> str:
    """Method and partitioner, plus the run name only where two runs would share a label."""
    shared = sum(r.label == run.label for r in runs) > 1
    return f"{run.label} ({run.name})" if shared else run.label


# ---------------------------------------------------------------- formatting


def _link(target: Path, out: Path) -> str:
    return quote(os.path.relpath(target.resolve(), out.resolve()).replace(os.sep, "/"))


def _mean_std(point: Point, digits: int = 2) -> str:
    text = f"{point.value:.{digits}f}"
    return f"{text} ± {point.std:.{digits}f}" if point.std is not None else text


def _fd_cell(run: Run) -> str:
    points = series(run, METRICS[0])
    if not points:
        return DASH
    last = points[-1]
    row = next(r for r in reversed(run.rows) if _num(r.get("round")) == last.round)
    quality = row.get("quality") or {}
    details = []
    if _num(quality.get("samples")) is not None:
        details.append(f"N={int(quality['samples'])}")
    if isinstance(quality.get("sampler"), str):
        details.append(quality["sampler"])
    if _num(quality.get("clients")) is not None:
        details.append(f"{int(quality['clients'])} client models")
    details.append(f"round {last.round}")
    return f"{_mean_std(last)} ({', '.join(details)})"


def _final(run: Run, metric: Metric, digits: int) -> str:
    points = series(run, metric)
    return _mean_std(points[-1], digits) if points else DASH


def _params(count: float) -> str:
    return f"{count / 1e6:.3f} M"


def _megabytes(size: float) -> str:
    return f"{size / 1e6:.2f} MB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def _reduction_cell(run: Run, runs: Sequence[Run]) -> str:
    if run.method == "full":
        return "0 % (reference)"
    full = full_counterpart(run, runs)
    found = comm_reduction(run, full) if full else None
    if found is None:
        return DASH
    fraction, rnd = found
    at = "" if rnd == comm_series(run)[-1].round == comm_series(full)[-1].round else f" (at round {rnd})"
    return f"{100 * fraction:.1f} %{at}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), line(["---"] * len(header)), *(line(r) for r in rows)]


# ---------------------------------------------------------------- sections


def header_section(runs: Sequence[Run]) -> list[str]:
    rows = []
    for run in runs:
        planned = run.setting("train", "rounds", "?")
        done = len(run.rows)
        rounds = f"{planned}" if done == planned else f"{done} of {planned} done"
        rows.append([f"`{run.name}`", run.method_label, str(run.setting("data", "name", "?")),
                     DASH if run.is_baseline else run.partitioner, rounds, clients(run),
                     str(run.setting("train", "local-epochs", "?"))])
    return [
        "# FedDiffuse run report",
        "",
        f"Generated {datetime.now().strftime('%Y-%m-%d %H:%M')} by `fedapp report` from {len(runs)} run(s).",
        "",
        *_table(["run", "method", "dataset", "partitioner", "rounds", "clients", "local epochs"], rows),
    ]


def quality_section(runs: Sequence[Run], out: Path) -> list[str]:
    lines = ["## Quality against round", "",
             "FD-CNN is the Fréchet distance in the feature space of our own Fashion-MNIST classifier; "
             "it is not the Inception FID, which is shown separately as FID (Inception). "
             "For per-client methods (ULatDec, UDec) each client's model is scored and the band is "
             "± one std over the clients."]
    for metric in METRICS:
        name = f"quality-{metric.key}.png"
        if plot_metric(runs, metric, out / name):
            lines += ["", f"### {metric.title}", "", f"![{metric.title}]({name})"]
    if len(lines) == 3:
        lines += ["", "_No run has an evaluation round yet._"]
    return lines


def comm_section(runs: Sequence[Run], out: Path) -> list[str]:
    lines = ["## Cumulative communication", ""]
    if plot_comm(runs, out / "communication.png"):
        lines.append("![cumulative communication](communication.png)")
    else:
        lines.append("_No run recorded communication._")
    skipped = [f"`{r.name}`" for r in runs if not comm_series(r)]
    if skipped:
        lines += ["", f"Not shown (no communication recorded, e.g. centralized): {', '.join(skipped)}."]
    return lines


def samples_section(runs: Sequence[Run], out: Path) -> list[str]:
    grids = [(run, *found) for run in runs if (found := last_grid(run))]
    lines = ["## Samples", ""]
    if not plot_samples(grids, out / "samples.png"):
        return lines + ["_No run has a sample grid yet._"]
    lines += ["The last sample grid of each run (per-client methods: one row per client's model).", "",
              "![sample grids](samples.png)", ""]
    lines += [f"- `{run.name}` ({run.label}): [round {rnd} grid]({_link(grid, out)})" for run, grid, rnd in grids]
    return lines


def labels_section(runs: Sequence[Run], out: Path) -> list[str]:
    lines = ["## Label distributions", ""]
    for run in runs:
        source = run.path / "label-distribution.png"
        if source.is_file():
            name = f"labels-{run.name}.png"
            shutil.copyfile(source, out / name)
            lines += [f"### `{run.name}` ({run.label})", "", f"![labels of {run.name}]({quote(name)})", ""]
    return lines if len(lines) > 2 else lines + ["_No run has a label-distribution plot._"]


def results_section(runs: Sequence[Run]) -> list[str]:
    header = ["run", "method", "partitioner", "final FD-CNN (own classifier)", "final FID (Inception)",
              "final eval loss", "train comm. (params, down+up)", "train comm. (MB)",
              "reduction vs full (same partitioner)", "eval comm. (MB)", "wall time"]
    rows, notes = [], []
    for run in runs:
        comm = comm_series(run)
        evaluate = eval_traffic(run)
        rows.append([
            f"`{run.name}`", run.method_label, DASH if run.is_baseline else run.partitioner, _fd_cell(run),
            _final(run, METRICS[1], 2), _final(run, METRICS[2], 4),
            _params(comm[-1].params) if comm else DASH, _megabytes(comm[-1].bytes) if comm else DASH,
            _reduction_cell(run, runs), _megabytes(evaluate.bytes) if evaluate else DASH,
            _duration(_num(run.rows[-1].get("wall_s")) if run.rows else None),
        ])
        notes += _run_notes(run, runs)
    lines = ["## Results", "", "Our runs, final values (last round that has each metric).", "",
             *_table(header, rows)]
    if notes:
        lines += ["", "Notes:", "", *notes]
    return lines


def _run_notes(run: Run, runs: Sequence[Run]) -> list[str]:
    notes = []
    if not run.rows:
        notes.append(f"- `{run.name}`: no completed round yet (metrics.jsonl missing or empty).")
    elif not series(run, METRICS[0]) and not series(run, METRICS[1]):
        notes.append(f"- `{run.name}`: no evaluation round with quality metrics yet.")
    full = full_counterpart(run, runs)
    if full and comm_reduction(run, full):
        notes.append(f"- `{run.name}`: reduction against `{full.name}` (training traffic, same round).")
    elif run.method not in ("full", BASELINE) and comm_series(run):
        notes.append(f"- `{run.name}`: no full run with partitioner {run.partitioner} in this report.")
    return notes


def reference_section() -> list[str]:
    rows = [["Centralized", f"{ref.CENTRALIZED_FID:.2f} (one model, all data)", "n/a", "n/a", "n/a"]]
    for method in ref.METHODS:
        fids = ref.FID.get(method, {})
        cells = [f"{f.mean:.2f} ± {f.std:.2f}" if (f := fids.get(p)) else DASH for p in ref.PARTITIONERS]
        saved = ref.COMM_REDUCTION_VS_FULL.get(method)
        comm = DASH if saved is None else ("0 % (reference)" if saved == 0 else f"about {100 * saved:g} % below Full")
        rows.append([PAPER_NAMES.get(method, method), *cells, comm])
    return [
        f"### Reference: the authors' numbers on their setup (FedDiffuse paper, {ref.SETUP}) "
        f"{DASH} not comparable in absolute value with FD-CNN",
        "",
        *_table(["method", "FID IID", "FID label skew", "FID quantity skew",
                 f"communication vs Full ({ref.COMM_SETUP})"], rows),
        "",
        f"Source: {ref.CITATION}. FID is mean ± std over the clients' models. Full and USplit FID are not "
        "in our reference. These are the authors' numbers, not results of this code.",
    ]


def write_report(run_dirs: Sequence[Path], out: Path) -> Path:
    """Reads every run first, so a bad path fails before anything is written."""
    runs = load_runs(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    sections = [header_section(runs), quality_section(runs, out), comm_section(runs, out),
                samples_section(runs, out), labels_section(runs, out), results_section(runs),
                reference_section()]
    path = out / "report.md"
    path.write_text("\n\n".join("\n".join(s).strip() for s in sections) + "\n")
    return path
