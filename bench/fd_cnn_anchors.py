"""Where FD-CNN values sit: the distance of real images, of an untrained model and of noise.

FD-CNN is our own scale (features of fedapp's Fashion-MNIST classifier), so a bare number says
little. This prints anchors measured against the same cached test-split statistics that runs use:
real training images (the floor for N samples), an untrained UNet's samples and pure noise
(the ceiling), each with the sample count the runs use.

    python -m bench.fd_cnn_anchors --n 256 --sampler-steps 25
"""

from __future__ import annotations

import argparse
import platform

import torch

from fedapp.config import parse_config
from fedapp.data.sources import load_split
from fedapp.eval.frechet import FD_CNN
from fedapp.eval.quality import QualityMeter
from fedapp.model.build import build_diffusion, build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="images per set (the runs' eval.metric-samples)")
    parser.add_argument("--sampler-steps", type=int, default=25, help="DDIM steps of the untrained model")
    parser.add_argument("--dim", type=int, default=16, help="UNet width of the untrained model")
    parser.add_argument("--seeds", type=int, default=3, help="independent draws per anchor")
    args = parser.parse_args()
    # x0 clipping on, as in the CPU default the runs use: unclipped, an untrained model diverges
    cfg = parse_config({"model.dim": args.dim, "eval.metric-samples": args.n, "eval.fid": "off",
                        "diffusion.clip-sample": True,
                        "eval.sampler-steps": args.sampler_steps, "output.progress": False})
    meter = QualityMeter(cfg)
    train = load_split(cfg.data, "train").images
    print(f"FD-CNN anchors against the test split, N={args.n}, torch {torch.__version__}, {platform.machine()}")
    for seed in range(args.seeds):
        gen = torch.Generator().manual_seed(seed)
        real = train[torch.randperm(len(train), generator=gen)[: args.n]]
        noise = torch.randn((args.n, 1, 28, 28), generator=gen).clamp(-1, 1)
        untrained = meter.draw(build_model(cfg, seed=seed), build_diffusion(cfg), args.n, seed=seed)
        scores = {name: meter.score(images)[FD_CNN]
                  for name, images in (("real train images", real), ("untrained UNet", untrained),
                                       ("Gaussian noise", noise))}
        print(f"seed {seed}: " + ", ".join(f"{name} {value:.2f}" for name, value in scores.items()))


if __name__ == "__main__":
    main()
