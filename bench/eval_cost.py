"""What evaluation costs: DDIM-S against DDPM-1000 sampling, and the feature extraction of the metrics.

It trains (or loads) one model, draws N images with each sampler from the same seed,
times each, and scores each with FD-CNN, so the speed-up and the metric change are
measured on the same model in one run. It also times FD-CNN and Inception (FID)
feature extraction for N images. Inception's real weights can't be downloaded on the
project's machines; without ``--fid-weights`` the FID network has random weights and
gives a time only, never a score.

    python bench/eval_cost.py --device cuda --train-steps 4000 --n 1000 --save /tmp/m.pt
    python bench/eval_cost.py --checkpoint /tmp/m.pt --n 256 --ddim 25,50
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from pytorch_fid import inception as pf_inception

from fedapp.builders import build_diffusion, build_model
from fedapp.checkpoint import load_checkpoint, save_checkpoint
from fedapp.config import DataConfig, parse_config
from fedapp.datasets import image_shape, load_split
from fedapp.frechet import ClassifierFeatures, feature_stats, frechet_distance, reference_stats, stats_dir
from fedapp.inception import InceptionFeatures
from fedapp.sampling import generate
from fedapp.training import train_local


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
    net = pf_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pf_inception.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pf_inception.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pf_inception.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pf_inception.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pf_inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pf_inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pf_inception.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pf_inception.FIDInceptionE_1(1280)
    net.Mixed_7c = pf_inception.FIDInceptionE_2(2048)
    path = folder / "random-fid-inception.pth"
    torch.save(net.state_dict(), path)
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
                             batch_size=args.batch, lr=args.lr, seed=0, device=device, max_steps=args.train_steps)
    print(f"trained {result.steps} steps at batch {args.batch} in {seconds:.1f} s "
          f"({result.images_per_s:.0f} img/s), final-epoch loss {result.loss:.4f}")
    if args.save:
        save_checkpoint(Path(args.save), cfg, args.train_steps, model)
    return model, cfg, seconds


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
    parser.add_argument("--ddim", default="25,50,100", help="DDIM step counts to compare")
    parser.add_argument("--sample-batch", type=int, default=1000)
    parser.add_argument("--fid-weights", default="")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}")
    model, cfg, train_s = trained_model(args, device)
    diffusion = build_diffusion(cfg)
    shape = image_shape(cfg.data)
    fd_cnn = ClassifierFeatures()
    reference = reference_stats(fd_cnn, cfg.data, "test", stats_dir(cfg.eval), device=device)
    figures: dict[str, object] = {"device": name, "n": args.n, "train_s": train_s, "samplers": {}}
    samplers = [("ddpm", None)] + [("ddim", int(s)) for s in args.ddim.split(",") if s]
    for kind, steps in samplers:
        images, seconds = _timed(device, generate, model, diffusion, args.n, shape, kind=kind, steps=steps,
                                 seed=1, device=device, batch_size=args.sample_batch)
        stats, feat_s = _timed(device, feature_stats, fd_cnn, images, batch_size=500, device=device)
        label = f"{kind}-{steps or cfg.diffusion.timesteps}"
        score = frechet_distance(stats, reference)
        figures["samplers"][label] = {"sample_s": seconds, "fd_cnn": score, "fd_cnn_features_s": feat_s}  # type: ignore[index]
        print(f"{label:>10}: {seconds:8.2f} s for {args.n} images, FD-CNN {score:8.2f} "
              f"(features {feat_s:.2f} s)")
    base = figures["samplers"]["ddpm-1000"]  # type: ignore[index]
    for label, row in figures["samplers"].items():  # type: ignore[attr-defined]
        print(f"{label:>10}: {base['sample_s'] / row['sample_s']:6.1f}x faster than DDPM-1000, "
              f"FD-CNN {100 * (row['fd_cnn'] / base['fd_cnn'] - 1):+6.1f} %")
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(args.fid_weights) if args.fid_weights else _random_fid_weights(Path(tmp))
        fid_net = InceptionFeatures(weights)
        images = generate(model, diffusion, args.n, shape, kind="ddim", steps=50, seed=2, device=device,
                          batch_size=args.sample_batch)
        _, fid_s = _timed(device, feature_stats, fid_net, images, batch_size=200, device=device)
    figures["fid_features_s"] = fid_s
    note = "" if args.fid_weights else " (random weights: time only)"
    print(f"Inception (FID) features for {args.n} images: {fid_s:.2f} s{note}")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
