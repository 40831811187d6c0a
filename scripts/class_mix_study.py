"""How much of a personalized client's FD-CNN is its class mix: each client model's FD-CNN (from the
run's metrics.jsonl, scored against the whole test split) beside the total variation distance of
its drawn classes to the training pool's and to its own partition's (the tables ``fedapp sample RUN
--client P --n 256 --classes`` prints, saved as ``CLASSES/NAME-clientP.txt``), and the Spearman
correlation between FD-CNN and the distance to the pool over every client model found.

Usage: python -m scripts.class_mix_study docs/results/study/label-skew-udec-s* ... [--classes docs/results/classes]
A run counts only where each of its clients has a saved table.
"""

from __future__ import annotations

import argparse
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from scipy.stats import spearmanr

_POOL = re.compile(r"total variation distance to training pool: ([0-9.]+)")
_OWN = re.compile(r"total variation distance to client \d+ of \d+: ([0-9.]+)")


@dataclass(frozen=True)
class ClientModel:
    run: str
    method: str
    client: int
    fd_cnn: float
    recall: float
    tvd_pool: float
    tvd_own: float


def table_distances(path: Path) -> tuple[float, float]:
    """(to the training pool, to the client's own partition) from one ``--classes`` table."""
    text = path.read_text()
    pool, own = _POOL.search(text), _OWN.search(text)
    if pool is None or own is None:
        raise ValueError(f"{path}: not a `fedapp sample --client P --classes` table (no distance lines)")
    return float(pool.group(1)), float(own.group(1))


def client_models(run: Path, classes: Path) -> list[ClientModel]:
    """The run's client models at its last evaluated round, each with its class table's distances."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = next((r for r in reversed(rows) if r.get("per_client")), None)
    if last is None:
        raise ValueError(f"{run}: no per-client metrics (not a personalized run?)")
    method = tomllib.loads((run / "config.toml").read_text())["strategy"]["name"]
    tables = {int(client): classes / f"{run.name}-client{client}.txt" for client in last["per_client"]}
    if not all(path.is_file() for path in tables.values()):
        return []
    out = []
    for client, path in sorted(tables.items()):
        scores = last["per_client"][str(client)]["evaluate"]
        pool, own = table_distances(path)
        out.append(ClientModel(run.name, method, client, float(scores["fd-cnn"]),
                               float(scores["fd-cnn-recall"]), pool, own))
    return out


def correlation(models: list[ClientModel]) -> tuple[float, float]:
    """Spearman's rho and its p-value between the distance to the pool and FD-CNN."""
    result = spearmanr([m.tvd_pool for m in models], [m.fd_cnn for m in models])
    return float(result.statistic), float(result.pvalue)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--classes", type=Path, default=Path("docs/results/classes"))
    args = parser.parse_args()
    models = []
    for run in args.runs:
        found = client_models(run, args.classes)
        if not found:
            print(f"skipped {run.name}: not every client has a table in {args.classes}")
        models += found
    if len(models) < 3:
        raise SystemExit(f"{len(models)} client models with class tables in {args.classes}; need 3 or more")
    print(f"{'run':<24} client  FD-CNN  recall  TVD pool  TVD own")
    for m in models:
        print(f"{m.run:<24} {m.client:>6}  {m.fd_cnn:>6.1f}  {m.recall:>6.3f}  {m.tvd_pool:>8.3f}  {m.tvd_own:>7.3f}")
    for method in sorted({m.method for m in models}):
        rho, p = correlation([m for m in models if m.method == method])
        print(f"{method}: Spearman rho(TVD to pool, FD-CNN) = {rho:.2f} (p = {p:.3f})")
    rho, p = correlation(models)
    print(f"all {len(models)} client models: Spearman rho(TVD to pool, FD-CNN) = {rho:.2f} (p = {p:.3f})")


if __name__ == "__main__":
    main()
