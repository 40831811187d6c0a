"""CollaFuse's trade-off over a cut-ratio sweep: quality per client against disclosure and client compute.

One row per run directory, read from what the run recorded (metrics.jsonl): the last
evaluation round's scores, the last round's audit, and the compute counters summed over
all rounds. A sweep repeated over seeds gives several runs per cut ratio: the plot draws each
run and joins the means over the runs at each c. A run not scored yet keeps its row, with no FD-CNN.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedapp.config import parse_config
from fedapp.report import figures
from fedapp.report.figures import plt
from fedapp.report.runs import load_run

COLUMNS: tuple[tuple[str, str], ...] = (
    ("cut-ratio", "c"),
    ("seed", "seed"),
    ("t-c", "t_c"),
    ("fd-cnn", "FD-CNN per client"),
    ("audit-xt-ssim", "SSIM(x_t, x0)"),
    ("audit-xt-mse", "MSE(x_t, x0)"),
    ("audit-solve-mse", "MSE solved x0"),
    ("audit-denoise-ssim", "SSIM denoiser x0"),
    ("audit-denoise-mse", "MSE denoiser x0"),
    ("train-samples", "client share, train samples"),
    ("train-seconds", "client share, train time"),
    ("infer-steps", "client share, sampling steps"),
    ("infer-seconds", "client share, sampling time"),
    ("up-mb", "uploaded MB"),
)


def _share(rows: list[dict[str, Any]], phase: str, unit: str) -> float | None:
    own = server = 0.0
    for row in rows:
        for counters in row.get("collafuse", {}).get("clients", {}).values():
            own += counters.get(f"{phase}-client-{unit}", 0.0)
            server += counters.get(f"{phase}-server-{unit}", 0.0)
    return own / (own + server) if own + server > 0 else None


def sweep_row(run: Path) -> dict[str, Any]:
    """The trade-off figures of one CollaFuse run."""
    loaded = load_run(run)
    cfg = parse_config(loaded.config)
    if cfg.strategy.name != "collafuse":
        raise ValueError(f"{run} is a {cfg.strategy.name} run, not a CollaFuse one")
    rows = loaded.rows
    if not rows:
        raise ValueError(f"{run} has no finished round in metrics.jsonl")
    scored = [r for r in rows if "fd-cnn" in r.get("quality", {})]
    quality = scored[-1]["quality"] if scored else {}
    last = rows[-1]
    audit = {**last.get("train", {}), **last.get("evaluate", {})}
    out: dict[str, Any] = {
        "run": run.name,
        "cut-ratio": cfg.collafuse.cut_ratio,
        "seed": cfg.seed,
        "t-c": cfg.collafuse.cut(cfg.diffusion.timesteps),
        "rounds": last["round"],
        "fd-cnn": quality.get("fd-cnn"),
        "fd-cnn-std": quality.get("fd-cnn-std"),
        "up-mb": sum(v["round"]["up_wire"] for r in rows for k, v in r["comm"].items() if k.startswith("train"))
        / 1e6,
    }
    for key in ("audit-xt-ssim", "audit-xt-mse", "audit-solve-mse", "audit-denoise-ssim", "audit-denoise-mse"):
        out[key] = audit.get(key)  # absent where the server received nothing (c = 1)
    for phase, unit in (("train", "samples"), ("train", "seconds"), ("infer", "steps"), ("infer", "seconds")):
        out[f"{phase}-{unit}"] = _share(rows, phase, unit)
    return out


def _cell(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        return "–"
    if key == "fd-cnn":
        std = row.get("fd-cnn-std")
        return f"{value:.1f} ± {std:.1f}" if std is not None else f"{value:.1f}"
    if key == "cut-ratio":
        return f"{value:g}"
    if key in ("t-c", "seed"):
        return str(value)
    if key.endswith("mse") and abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = "| " + " | ".join(label for _, label in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(row, key) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def by_cut(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """The cut ratios where some run has ``key``, and the mean of ``key`` over those runs."""
    values: dict[float, list[float]] = {}
    for row in rows:
        if row.get(key) is not None:
            values.setdefault(row["cut-ratio"], []).append(row[key])
    cuts = sorted(values)
    return cuts, [statistics.fmean(values[c]) for c in cuts]


def plot(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Left: quality against what the server sees; right: quality and client compute against c.

    Each scored run is a point (its bar: the spread over its clients); the lines join the means over
    the runs at each cut ratio, so seeds of one c do not zigzag."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5))
    seen = [r for r in rows if r["fd-cnn"] is not None and r["audit-xt-ssim"] is not None]
    left.errorbar([r["audit-xt-ssim"] for r in seen], [r["fd-cnn"] for r in seen],
                  yerr=[r["fd-cnn-std"] or 0 for r in seen], fmt="o")
    for r in seen:
        left.annotate(f"c={r['cut-ratio']:g}", (r["audit-xt-ssim"], r["fd-cnn"]), textcoords="offset points",
                      xytext=(5, 5))
    left.set_xlabel("disclosure: mean SSIM(x_t received, client x0)")
    left.set_ylabel("FD-CNN per client (lower is better)")
    scored = [r for r in rows if r["fd-cnn"] is not None]
    right.errorbar([r["cut-ratio"] for r in scored], [r["fd-cnn"] for r in scored],
                   yerr=[r["fd-cnn-std"] or 0 for r in scored], fmt="o", color="tab:blue", alpha=0.6)
    right.plot(*by_cut(rows, "fd-cnn"), "-", color="tab:blue", label="FD-CNN per client (mean over runs)")
    right.set_xlabel("cut ratio c (clients' share of the chain)")
    right.set_ylabel("FD-CNN per client")
    twin = right.twinx()
    twin.plot([0, 1], [0, 1], "-", color="0.8", lw=1, label="client share = c")
    twin.plot(*by_cut(rows, "train-samples"), "D-.", color="tab:purple", label="client share of training samples")
    twin.plot(*by_cut(rows, "train-seconds"), "s--", color="tab:green", label="client share of training time")
    twin.plot(*by_cut(rows, "infer-steps"), "^:", color="tab:red", label="client share of sampling steps")
    twin.set_ylabel("client share")
    twin.set_ylim(-0.05, 1.05)
    lines = right.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    labels = right.get_legend_handles_labels()[1] + twin.get_legend_handles_labels()[1]
    right.legend(lines, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)  # off the data
    fig.suptitle("CollaFuse trade-off")
    fig.tight_layout()
    return figures.save_figure(fig, path)


def write_tradeoff(runs: Sequence[Path], out: Path) -> Path:
    """tradeoff.md (the table) and tradeoff.png under ``out``; the runs sorted by cut ratio, then seed."""
    rows = sorted((sweep_row(Path(r)) for r in runs), key=lambda r: (r["cut-ratio"], r["seed"]))
    out.mkdir(parents=True, exist_ok=True)
    figure = plot(rows, out / "tradeoff.png")
    text = "\n".join([
        "# CollaFuse cut-ratio sweep", "",
        f"Runs: {', '.join(r['run'] for r in rows)}. FD-CNN: the last evaluation round, mean ± std over clients "
        "(– where the run has not been scored yet).",
        "Disclosure: the last round's uploads (x_t, the x0 solved from x_t and the target, the server",
        "denoiser's x0), against the client's real images. Shares: client / (client + server), all rounds;",
        "train samples counts the (x_t, t) pairs each side's model trained on (its compute, if a step",
        "cost the same per sample), train time the wall seconds each side spent training (longer for",
        "ClientApps that share their cores with each other than for a server alone on them).", "",
        table(rows), "", f"![trade-off]({figure.name})", "",
    ])
    (out / "tradeoff.md").write_text(text)
    return out / "tradeoff.md"
