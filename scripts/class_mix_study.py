"""How much of a model's FD-CNN is its class mix: each model's FD-CNN (from the run's metrics.jsonl,
scored against the whole test split) beside the total variation distance of its drawn classes to
the training pool's and, for a client's own model, to its partition's (the tables ``fedapp sample
RUN [--client P] --n 256 --classes`` prints, saved as ``CLASSES/NAME-clientP.txt`` for each client of
a personalized run, ``CLASSES/NAME.txt`` for a global model), and the Spearman correlation between
FD-CNN and the distance to the pool for each method with 5 or more models.

With ``--mix-floor``, also what the class mix alone costs: the FD-CNN that real images of the
reference split score when drawn in the model's class mix (as many as the run scored, seeded), the
score a generator with perfect images and this model's classes would get.

Usage: python -m scripts.class_mix_study docs/results/study/label-skew-udec-s* ... [--classes DIR] [--mix-floor]
A run counts only where each of its models has a saved table.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from fedapp.config import FedConfig, parse_config
from fedapp.data.sources import CLASS_NAMES, load_split
from fedapp.eval.frechet import FD_CNN
from fedapp.eval.quality import QualityMeter
from fedapp.report.runs import Run, dig, load_run, num

_ROW = re.compile(r"^(?P<name>\S.*?)\s+(?P<drawn>\d+)\s+[0-9.]+%", re.MULTILINE)
_POOL = re.compile(r"total variation distance to training pool: ([0-9.]+)")
_OWN = re.compile(r"total variation distance to client \d+ of \d+: ([0-9.]+)")


@dataclass(frozen=True)
class ScoredModel:
    run: str
    method: str
    client: int | None  # None: the run's global model
    fd_cnn: float
    recall: float
    tvd_pool: float
    tvd_own: float | None  # to the client's own partition
    drawn: tuple[int, ...]  # the table's count of each class
    mix_floor: float | None = None  # FD-CNN of real images in the drawn class mix


def table_distances(path: Path) -> tuple[float, float | None]:
    """(to the training pool, to the client's own partition where the table has it) from one
    ``--classes`` table."""
    text = path.read_text()
    pool, own = _POOL.search(text), _OWN.search(text)
    if pool is None:
        raise ValueError(f"{path}: not a `fedapp sample --classes` table (no distance to the training pool)")
    return float(pool.group(1)), float(own.group(1)) if own is not None else None


def drawn_counts(path: Path, names: tuple[str, ...]) -> tuple[int, ...]:
    """Each class's drawn count, in label order, from one ``--classes`` table."""
    found = {m["name"]: int(m["drawn"]) for m in _ROW.finditer(path.read_text())}
    if set(names) - set(found):
        raise ValueError(f"{path}: no row for {', '.join(sorted(set(names) - set(found)))}")
    return tuple(found[name] for name in names)


def mix_indices(labels: torch.Tensor, counts: tuple[int, ...], n: int, seed: int) -> torch.Tensor:
    """Indices of about ``n`` items of ``labels`` in the class shares ``counts`` give, each class's
    drawn at random without replacement (seeded)."""
    total = max(sum(counts), 1)
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for label, count in enumerate(counts):
        pool = torch.nonzero(labels == label).flatten()
        take = round(n * count / total)
        if take > len(pool):
            raise ValueError(f"class {label}: {take} images wanted, only {len(pool)} there")
        picked.append(pool[torch.randperm(len(pool), generator=generator)[:take]])
    return torch.cat(picked)


def real_in_mix(cfg: FedConfig, counts: tuple[int, ...]) -> torch.Tensor:
    """eval.metric-samples real images of the reference split in the class mix of ``counts``."""
    real = load_split(cfg.data, cfg.eval.reference_split)
    return real.images[mix_indices(real.labels, counts, cfg.eval.metric_samples, cfg.seed)]


def mix_floor(meter: QualityMeter, counts: tuple[int, ...]) -> float:
    """The FD-CNN of real images drawn in the class mix ``counts``, scored as the meter's run scores
    its samples."""
    return meter.score(real_in_mix(meter.cfg, counts))[FD_CNN]


def scored_models(run: Run, classes: Path) -> list[ScoredModel]:
    """The run's models at its last scored round (each client's own in a personalized run, else the
    global one), each with its class table's distances; none where a table is missing."""
    row = next((r for r in reversed(run.rows) if num(dig(r, "quality", FD_CNN)) is not None), None)
    if row is None:
        raise ValueError(f"{run.path}: no scored round in metrics.jsonl")
    per_client = row.get("per_client")
    entries: list[tuple[int | None, dict[str, float], Path]]  # (client, its scores, its table)
    if isinstance(per_client, dict) and per_client:
        entries = [(int(c), e["evaluate"], classes / f"{run.name}-client{c}.txt")
                   for c, e in sorted(per_client.items(), key=lambda item: int(item[0]))]
    else:
        entries = [(None, row["quality"], classes / f"{run.name}.txt")]
    if not all(path.is_file() for _, _, path in entries):
        return []
    names = CLASS_NAMES[run.setting("data", "name")]
    out = []
    for client, scores, path in entries:
        pool, own = table_distances(path)
        out.append(ScoredModel(run.name, run.method, client, float(scores[FD_CNN]),
                               float(scores.get(f"{FD_CNN}-recall", float("nan"))), pool, own,
                               drawn_counts(path, names)))
    return out


def correlation(models: list[ScoredModel]) -> tuple[float, float]:
    """Spearman's rho and its p-value between the distance to the pool and FD-CNN."""
    result = spearmanr([m.tvd_pool for m in models], [m.fd_cnn for m in models])
    return float(result.statistic), float(result.pvalue)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--classes", type=Path, default=Path("docs/results/classes"))
    parser.add_argument("--mix-floor", action="store_true",
                        help="also score real images drawn in each model's class mix (needs the data set)")
    args = parser.parse_args()
    models = []
    for path in args.runs:
        run = load_run(path)
        found = scored_models(run, args.classes)
        if not found:
            print(f"skipped {run.name}: not every model has a table in {args.classes}")
        if args.mix_floor:
            meter = QualityMeter(parse_config(run.config))
            found = [replace(m, mix_floor=mix_floor(meter, m.drawn)) for m in found]
        models += found
    if not models:
        raise SystemExit(f"no model of these runs has a class table in {args.classes}")
    print(f"{'run':<24} client  FD-CNN  recall  TVD pool  TVD own" + ("  real in its mix" if args.mix_floor else ""))
    for m in models:
        floor = f"  {m.mix_floor:>15.1f}" if m.mix_floor is not None else ""
        client = "global" if m.client is None else str(m.client)
        own = f"{m.tvd_own:>7.3f}" if m.tvd_own is not None else f"{'—':>7}"
        print(f"{m.run:<24} {client:>6}  {m.fd_cnn:>6.1f}  {m.recall:>6.3f}  {m.tvd_pool:>8.3f}  {own}{floor}")
    groups = {method: [m for m in models if m.method == method] for method in sorted({m.method for m in models})}
    if len(groups) > 1:
        groups[f"all {len(models)} models"] = models
    for name, group in groups.items():
        if len(group) >= 5:  # fewer ranks say nothing
            rho, p = correlation(group)
            print(f"{name}: Spearman rho(TVD to pool, FD-CNN) = {rho:.2f} (p = {p:.3f})")
    if args.mix_floor:
        for run in dict.fromkeys(m.run for m in models):
            mine = [m for m in models if m.run == run]
            print(f"{run}: the models' mean FD-CNN {np.mean([m.fd_cnn for m in mine]):.1f}, real images "
                  f"in their class mixes {np.mean([m.mix_floor for m in mine if m.mix_floor is not None]):.1f}")
        shares = np.array([m.mix_floor / m.fd_cnn for m in models if m.mix_floor is not None])
        print(f"real images in the models' class mixes score {shares.mean():.1%} of the models' FD-CNN "
              f"(range {shares.min():.1%}–{shares.max():.1%})")


if __name__ == "__main__":
    main()
