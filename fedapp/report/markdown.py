"""``fedapp report``: one Markdown page with figures that puts several run directories side by side.

Everything is read from what the app writes into a run directory (``config.toml``, ``metrics.jsonl``,
sample grids, ``label-distribution.png``), so a report can be made of finished runs, of runs still
going, and of runs made by older versions: missing data shows as "—" with a note, never as a crash.
"""

from __future__ import annotations

import os
import shutil
import statistics
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

from fedapp.protocol.keys import DP_EPSILON, DP_SGD_EPSILON
from fedapp.report import reference as ref
from fedapp.report.figures import plot_comm, plot_metric, plot_ratios, plot_samples
from fedapp.report.ratios import authors_ratio, seed_label, seed_order, seed_ratios
from fedapp.report.runs import (
    BASELINE,
    DASH,
    METRICS,
    PAPER_NAMES,
    Metric,
    Point,
    Run,
    clients,
    comm_reduction,
    comm_series,
    eval_traffic,
    full_counterpart,
    last_grid,
    load_run,
    load_runs,
    num,
    read_audit,
    series,
)

__all__ = ["comm_reduction", "load_run", "write_report"]

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
    row = next(r for r in reversed(run.rows) if num(r.get("round")) == last.round)
    quality = row.get("quality") or {}
    details = []
    if num(quality.get("samples")) is not None:
        details.append(f"N={int(quality['samples'])}")
    if isinstance(quality.get("sampler"), str):
        details.append(quality["sampler"])
    if num(quality.get("clients")) is not None:
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
            _duration(num(run.rows[-1].get("wall_s")) if run.rows else None),
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
        notes.append(f"- `{run.name}`: no completed round yet (metrics.jsonl is empty).")
    elif not series(run, METRICS[0]) and not series(run, METRICS[1]):
        notes.append(f"- `{run.name}`: no evaluation round with quality metrics yet.")
    full = full_counterpart(run, runs)
    if full and comm_reduction(run, full):
        notes.append(f"- `{run.name}`: reduction against `{full.name}` (training traffic, same round).")
    elif run.method == "collafuse" and comm_series(run):
        notes.append(f"- `{run.name}`: CollaFuse's traffic is the values of x_t, ε and t it sends, not model "
                     "parameters, so no reduction against Full is given.")
    elif run.method not in ("full", BASELINE) and comm_series(run):
        notes.append(f"- `{run.name}`: no full run with partitioner {run.partitioner} in this report.")
    return notes


def ratio_section(runs: Sequence[Run], out: Path) -> list[str]:
    """Each setting's FD-CNN over the baseline's at the same seed, pooled over seeds; nothing without a pair."""
    groups, notes = seed_ratios(runs)
    if not groups and not notes:
        return []
    rows, plotted = [], []
    for (method, partitioner, cut), pairs in groups.items():
        pairs = sorted(pairs, key=lambda p: seed_order(p.seed))
        cut_label = [] if cut is None else [f"c = {cut:g}"]
        name = " · ".join([PAPER_NAMES.get(method, method), partitioner, *cut_label])
        ratios = [p.ratio for p in pairs]
        clients = [r for p in pairs for r in p.client_ratios]
        pooled = _mean_spread(ratios, 2) + ("" if len(ratios) > 1 else " (one seed: not yet a result)")
        precision = [p.score.precision for p in pairs if p.score.precision is not None]
        recall = [p.score.recall for p in pairs if p.score.recall is not None]
        paper = authors_ratio(method, partitioner)
        plotted.append((name, pairs, paper))
        rows.append([name, ", ".join(seed_label(p.seed) for p in pairs),
                     ", ".join(f"{p.score.fd:.1f} / {p.baseline.fd:.1f}" for p in pairs),
                     ", ".join(f"{r:.2f}" for r in ratios), pooled,
                     f"{min(clients):.2f}–{max(clients):.2f}" if len(clients) > 1 else DASH,
                     _mean_spread(precision, 3), _mean_spread(recall, 3),
                     DASH if paper is None else f"{paper:.2f}"])
    lines = ["## Ratio to centralized", "",
             "Each run's final FD-CNN (a personalized run's: the mean over its clients' own models) over the "
             "centralized baseline's at the same seed, scored on as many samples after as many rounds. "
             "± is the population std over seeds; the models' range spans every model scored: each client's own "
             "model in a personalized run, the one global model in the others, at every seed. "
             "Precision and recall (Kynkäänniemi et al. 2019) are in the same features, mean over seeds. "
             f"The authors' ratio is their FID over their centralized FID ({ref.CENTRALIZED_FID:.2f}): "
             "only ratios compare across feature spaces.", ""]
    if rows:
        lines += _table(["setting", "seeds", "FD-CNN / baseline's, per seed", "ratio per seed",
                         "ratio over seeds", "models' ratios", "precision", "recall", "authors' ratio"], rows)
    if plot_ratios(plotted, out / "ratios.png"):
        lines += ["", "![ratio to centralized per setting](ratios.png)"]
    if notes:
        lines += ["", "Not in the table:", "", *notes]
    return lines


def privacy_section(runs: Sequence[Run]) -> list[str]:
    """ε spent by each private run and what the membership audit found; nothing without either."""
    rows = []
    for run in runs:
        train = run.rows[-1].get("train", {}) if run.rows else {}
        client, sample = num(train.get(DP_EPSILON)), num(train.get(DP_SGD_EPSILON))
        audit = read_audit(run)
        if client is None and sample is None and audit is None:
            continue
        aucs = [float(c["auc"]) for c in audit["clients"]] if audit else []
        tprs = [float(c["tpr@1%fpr"]) for c in audit["clients"]] if audit else []
        rows.append([f"`{run.name}`", run.method_label, DASH if client is None else f"{client:.2f}",
                     DASH if sample is None else f"{sample:.2f}", f"{run.setting('privacy', 'delta', DASH)}",
                     _mean_spread(aucs, 3), _mean_spread(tprs, 3), str(len(aucs)) if aucs else DASH])
    if not rows:
        return []
    return ["## Privacy", "",
            "ε at δ after the last round: client level from the server's account, DP-SGD the worst client's. "
            "The membership audit (`fedapp audit`) attacks each client's images with their denoising loss: "
            "ROC AUC 0.5 and TPR = 1 % at 1 % FPR are a coin flip.", "",
            *_table(["run", "method", "client-level ε", "DP-SGD ε", "δ", "audit ROC AUC",
                     "audit TPR at 1 % FPR", "clients audited"], rows)]


def _mean_spread(values: Sequence[float], digits: int) -> str:
    if not values:
        return DASH
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f} ± {statistics.pstdev(values):.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


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
                ratio_section(runs, out), privacy_section(runs), reference_section()]
    path = out / "report.md"
    path.write_text("\n\n".join("\n".join(s).strip() for s in sections if s) + "\n")
    return path
