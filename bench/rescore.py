"""A finished run's model scored again on fresh sample seeds: how much of an FD-CNN is the draw.

A run scores its model once, on ``eval.metric-samples`` images from one sample seed; at 256
samples a second draw moves FD-CNN by tens of points, so two models (or a model and a target)
are only told apart by scoring each on several seeds. This loads a run's ``final.pt`` (its EMA
weights where it kept one, as the run itself sampled) and measures it exactly as the run's own
evaluation did (the same :class:`~fedapp.eval.quality.QualityMeter`, sampler and sample count),
once per seed. A CollaFuse run with a cut, or a personalized run's clients, are not covered: the
server's model alone is what this scores.

    python -m bench.rescore runs/mr-default-a runs/mr-decay01-a --seeds 1 2
    python -m bench.rescore runs/study/centralized-s0 --seeds 1 2 --samples 1000

One JSON line per run: ``{"run", "round", "own", "seeds": {seed: fd-cnn}, "mean", "std"}``, where
``own`` is the score the run logged for its last evaluation.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from fedapp.eval.frechet import FD_CNN
from fedapp.eval.quality import QualityMeter
from fedapp.model.build import build_diffusion
from fedapp.runs.checkpoint import load_checkpoint
from fedapp.runs.rundir import read_jsonl


def logged_score(run: Path) -> float | None:
    """The FD-CNN of the run's last evaluated round, as it logged it."""
    scores = [row["quality"][FD_CNN] for row in read_jsonl(run / "metrics.jsonl") if FD_CNN in row.get("quality", {})]
    return scores[-1] if scores else None


def rescore(run: Path, seeds: list[int], samples: int = 0, device: str = "cpu") -> dict[str, object]:
    model, cfg, payload = load_checkpoint(run / "final.pt", device=device)
    if cfg.strategy.name == "collafuse" and cfg.collafuse.cut(cfg.diffusion.timesteps) > 0:
        raise ValueError(f"{run}: a CollaFuse run with a cut; its server model alone does not sample images")
    if samples:
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"metric_samples": samples})})
    meter, diffusion = QualityMeter(cfg, device), build_diffusion(cfg)
    if not meter.enabled:
        raise ValueError(f"{run}: its config measures no quality (eval.metric-samples = 0); pass --samples N")
    scores = {seed: meter.measure(model, diffusion, seed)[0][FD_CNN] for seed in seeds}
    values = list(scores.values())
    return {"run": str(run), "round": payload["round"], "own": logged_score(run), "samples": cfg.eval.metric_samples,
            "seeds": {str(seed): round(score, 1) for seed, score in scores.items()},
            "mean": round(statistics.fmean(values), 1),
            "std": round(statistics.stdev(values), 1) if len(values) > 1 else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories holding final.pt")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2], help="sample seeds (the run's own is cfg.seed)")
    parser.add_argument("--samples", type=int, default=0, help="images per score (0: the run's eval.metric-samples)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    for run in args.runs:
        print(json.dumps(rescore(run, args.seeds, args.samples, args.device)), flush=True)


if __name__ == "__main__":
    main()
