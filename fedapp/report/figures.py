"""Every figure fedapp draws (matplotlib, no display needed): quality and communication per round,
the last sample grids side by side, each setting's ratio to centralized beside the authors', and the
analytic cumulative communication (``fedapp comm``)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedapp.report.ratios import SeedRatio, seed_label, seed_order  # noqa: E402
from fedapp.report.runs import DPI, PER_ROW, Metric, Run, comm_series, series  # noqa: E402

# ---------------------------------------------------------------- figures


LINESTYLES = ("-", "--", ":", "-.")


def _style(index: int) -> dict[str, str]:
    """The index-th run's colour and dash: matplotlib's ten colours repeat, so each ten runs get a new dash."""
    return {"color": f"C{index % 10}", "linestyle": LINESTYLES[index // 10 % len(LINESTYLES)]}


def _legend_beside(ax: plt.Axes, fontsize: int = 8) -> None:
    """The legend right of the axes, where a study's many runs cover no curve."""
    ax.legend(fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def save_figure(fig: plt.Figure, path: Path) -> Path:
    """The one writer of the report's figures (``fedapp tradeoff``'s too): trimmed to what is drawn."""
    path.parent.mkdir(parents=True, exist_ok=True)
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
    for index, (run, points) in enumerate(curves):
        xs = [p.round for p in points]
        ys = [p.value for p in points]
        (line,) = ax.plot(xs, ys, marker="o", ms=4, label=_legend(run, [r for r, _ in curves]), **_style(index))
        if any(p.std is not None for p in points):
            low = [p.value - p.std if p.std is not None else math.nan for p in points]
            high = [p.value + p.std if p.std is not None else math.nan for p in points]
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("round")
    ax.set_ylabel(metric.title if len(metric.title) < 40 else metric.title.split(" (")[0])
    ax.set_title(f"{metric.title}\nlower is better; band: ± std over the clients' models", fontsize=9)
    _round_axis(ax)
    ax.grid(alpha=0.3)
    _legend_beside(ax)
    return save_figure(fig, path)


def plot_comm(runs: Sequence[Run], path: Path) -> Path | None:
    curves = [(run, comm_series(run)) for run in runs]
    curves = [(run, points) for run, points in curves if points]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for index, (run, points) in enumerate(curves):
        ax.plot([p.round for p in points], [p.params / 1e6 for p in points], marker="o", ms=4,
                label=_legend(run, [r for r, _ in curves]), **_style(index))
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative values sent, down + up (millions)")
    ax.set_title("cumulative training communication: parameters, or CollaFuse's x_t and ε "
                 "(evaluation traffic not included)", fontsize=9)
    _round_axis(ax)
    ax.grid(alpha=0.3)
    _legend_beside(ax)
    return save_figure(fig, path)


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
    return save_figure(fig, path)


def plot_ratios(rows: Sequence[tuple[str, Sequence[SeedRatio], float | None]], path: Path) -> Path | None:
    """One line per setting: every client model's ratio (grey), each seed's (colour), their mean (bar),
    and the authors' FID ratio (red cross), against the centralized baseline at 1."""
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.45 * len(rows)))
    seeds = sorted({p.seed for _, pairs, _ in rows for p in pairs}, key=seed_order)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labelled: set[str] = set()

    def once(label: str) -> str | None:
        """Each legend entry once, however many settings draw it."""
        if label in labelled:
            return None
        labelled.add(label)
        return label

    for y, (_, pairs, paper) in enumerate(rows):
        models = [r for p in pairs for r in p.client_ratios if len(p.client_ratios) > 1]
        if models:
            ax.scatter(models, [y] * len(models), s=14, color="0.6", zorder=2, label=once("a client's own model"))
        for pair in pairs:
            index = seeds.index(pair.seed)
            ax.scatter([pair.ratio], [y], s=40, color=colours[index % len(colours)], zorder=3,
                       label=once(f"seed {seed_label(pair.seed)}"))
        mean = statistics.fmean(p.ratio for p in pairs)
        ax.scatter([mean], [y], s=300, marker="|", color="black", zorder=4, label=once("mean over seeds"))
        if paper is not None:
            ax.scatter([paper], [y], s=50, marker="x", color="tab:red", zorder=4, label=once("authors (Inception FID)"))
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1, label="centralized")
    ax.set_yticks(range(len(rows)), [name for name, _, _ in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(left=0)
    ax.set_xlabel("FD-CNN over the centralized baseline's at the same seed (lower is better)")
    ax.grid(axis="x", alpha=0.3)
    _legend_beside(ax, fontsize=7)
    return save_figure(fig, path)


def _round_axis(ax: plt.Axes) -> None:
    """Whole rounds on the x axis; with a single round (an eval every 5 of 5) matplotlib's default
    span of ±0.3 holds one integer, and the locator falls back to ticks such as 4.86 and 4.92."""
    low, high = ax.get_xlim()
    if high - low < 2:
        middle = (low + high) / 2
        ax.set_xlim(middle - 1, middle + 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend(run: Run, runs: Sequence[Run]) -> str:
    """Method and partitioner, plus the run name only where two runs would share a label."""
    shared = sum(r.label == run.label for r in runs) > 1
    return f"{run.label} ({run.name})" if shared else run.label


def plot_cumulative_comm(curves: Mapping[str, Sequence[float]], path: Path, title: str) -> Path:
    """Cumulative parameters exchanged per method over rounds (FedDiffuse's Figure 4)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, values in curves.items():
        ax.plot(range(1, len(values) + 1), [v / 1e6 for v in values], marker="o", ms=3, label=method)
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative parameters exchanged (millions)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)
