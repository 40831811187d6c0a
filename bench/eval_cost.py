"""What evaluation costs: DDIM-S against DDPM-1000 sampling, and the feature extraction of the metrics.

It trains (or loads) one model, draws N images with each sampler from the same seed,
times each, and scores each with FD-CNN, so the speed-up and the metric change are
measured on the same model in one run. It also times FD-CNN and Inception (FID)
feature extraction for N images. Inception's real weights can't be downloaded on the
project's machines; without ``--fid-weights`` the FID network has random weights and
gives a time only, never a score.

    python -m bench.eval_cost --device cuda --train-steps 4000 --n 1000 --save /tmp/m.pt
    python -m bench.eval_cost --checkpoint /tmp/m.pt --n 256 --samplers ddim-50,ddim-50-eta1,ddpm-100
    python -m bench.eval_cost --checkpoint /tmp/m.pt --n 1000 --features-only     # the metrics' cost
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from fedapp.config import DataConfig, parse_config
from fedapp.data.pixels import image_shape
from fedapp.data.sources import load_split
from fedapp.eval.frechet import (
    ClassifierFeatures,
    feature_stats,
    frechet_distance,
    reference_stats,
    stats_dir,
)
from fedapp.eval.inception import InceptionFeatures, fid_inception_architecture
from fedapp.model.build import build_diffusion, build_model
from fedapp.model.sampling import generate
from fedapp.runs.checkpoint import load_checkpoint, save_checkpoint
from fedapp.train.loop import train_local
from fedapp.train.optim import Recipe


def _timed(on: torch.device, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    if on.type == "cuda":
        torch.cuda.synchronize(on)
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    if on.type == "cuda":
        torch.cuda.synchronize(on)
    return out, time.perf_counter() - start


def _random_fid_weights(folder: Path) -> Path:
    """The FID Inception's architecture with random weights: its speed is the real one."""
    path = folder / "random-fid-inception.pth"
    torch.save(fid_inception_architecture().state_dict(), path)
    return path


def trained_model(args: argparse.Namespace, device: torch.device):  # type: ignore[no-untyped-def]
    if args.checkpoint:
        model, cfg, _ = load_checkpoint(Path(args.checkpoint))
        return model, cfg, 0.0
    cfg = parse_config({"model.dim": args.dim, "train.batch-size": args.batch, "train.lr": args.lr,
                        "diffusion.clip-sample": True, "seed": 0})
    model = build_model(cfg, seed=0)
    images = load_split(DataConfig(), "train").images
    result, seconds = _timed(device, train_local, model, build_diffusion(cfg), images, epochs=10_000,
                             batch_size=args.batch, recipe=Recipe(args.lr), seed=0, device=device, max_steps=args.train_steps)
    print(f"trained {result.steps} steps at batch {args.batch} in {seconds:.1f} s "
          f"({result.images_per_s:.0f} img/s), final-epoch loss {result.loss:.4f}")
    if args.save:
        save_checkpoint(Path(args.save), cfg, args.train_steps, model)
    return model, cfg, seconds


def compare_samplers(model, cfg, args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, float]]:  # type: ignore[no-untyped-def]
    """Each sampler's time for N images and its FD-CNN, against the full DDPM chain."""
    diffusion = build_diffusion(cfg)
    fd_cnn = ClassifierFeatures()
    reference = reference_stats(fd_cnn, cfg.data, "test", stats_dir(cfg.eval), device=device)
    rows: dict[str, dict[str, float]] = {}
    for label in [f"ddpm-{cfg.diffusion.timesteps}", *(s for s in args.samplers.split(",") if s)]:
        kind, steps, *rest = label.split("-")
        eta = float(rest[0].removeprefix("eta")) if rest else 0.0
        images, seconds = _timed(device, generate, model, diffusion, args.n, image_shape(cfg.data), kind=kind,
                                 steps=int(steps), seed=1, device=device, batch_size=args.sample_batch, eta=eta)
        stats = feature_stats(fd_cnn, images, batch_size=500, device=device)
        rows[label] = {"sample_s": seconds, "fd_cnn": frechet_distance(stats, reference)}
        print(f"{label:>13}: {seconds:8.2f} s for {args.n} images, FD-CNN {rows[label]['fd_cnn']:8.2f}")
    base = rows[f"ddpm-{cfg.diffusion.timesteps}"]
    for label, row in rows.items():
        print(f"{label:>13}: {base['sample_s'] / row['sample_s']:6.1f}x faster than the full chain, "
              f"FD-CNN {100 * (row['fd_cnn'] / base['fd_cnn'] - 1):+6.1f} %")
    return rows


def feature_times(cfg, args: argparse.Namespace, device: torch.device) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Feature extraction for N images in each metric's network (real images: the time is the same)."""
    images = load_split(cfg.data, "train").images[: args.n]
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(args.fid_weights) if args.fid_weights else _random_fid_weights(Path(tmp))
        for key, space in (("fd_cnn_features_s", ClassifierFeatures()), ("fid_features_s", InceptionFeatures(weights))):
            feature_stats(space, images[:8], batch_size=8, device=device)  # warm-up
            _, out[key] = _timed(device, feature_stats, space, images, batch_size=200, device=device)
    note = "" if args.fid_weights else " (random weights: a time, never a score)"
    print(f"features of {args.n} images: FD-CNN {out['fd_cnn_features_s']:.2f} s, "
          f"Inception (FID) {out['fid_features_s']:.2f} s{note}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--checkpoint", default="", help="a fedapp checkpoint to evaluate instead of training")
    parser.add_argument("--train-steps", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=28)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--save", default="")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--samplers", default="ddim-25,ddim-50,ddim-100,ddim-50-eta1,ddim-100-eta1,ddpm-50,ddpm-100,ddpm-200",
                        help="KIND-STEPS[-etaE] to compare with ddpm-1000: ddim-50, ddim-50-eta1, ddpm-100 (strided)")
    parser.add_argument("--sample-batch", type=int, default=1000)
    parser.add_argument("--fid-weights", default="")
    parser.add_argument("--features-only", action="store_true", help="only time the metrics' feature networks")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}")
    model, cfg, train_s = trained_model(args, device)
    figures: dict[str, object] = {"device": name, "n": args.n, "train_s": train_s, "samplers": {}}
    if not args.features_only:
        figures["samplers"] = compare_samplers(model, cfg, args, device)
    figures.update(feature_times(cfg, args, device))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
