"""Images/s of fedapp's local training step against a plain PyTorch loop.

Both take the same optimizer steps on the same real images with the same model and
batch, interleaved in one process so machine noise hits both alike; the ratio is what
to compare across machines.

    python bench/train_throughput.py --dim 16 --batch 64 --steps 60 --repeats 3
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch.nn import functional as F

from fedapp.config import DataConfig
from fedapp.datasets import load_split
from fedapp.diffusion import Diffusion
from fedapp.training import train_local
from fedapp.unet import UNet


def plain_loop(model: UNet, images: torch.Tensor, batch: int, steps: int, lr: float) -> float:
    """The reference: a textbook DDPM step written without any fedapp helper."""
    betas = torch.linspace(1e-4, 0.02, 1000)
    abar = torch.cumprod(1 - betas, 0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch,))
        x0 = images[idx].float() / 127.5 - 1
        t = torch.randint(0, 1000, (batch,))
        eps = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1)
        loss = F.smooth_l1_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def fedapp_loop(model: UNet, images: torch.Tensor, batch: int, steps: int, lr: float) -> float:
    subset = images[: steps * batch]
    result = train_local(model, Diffusion(), subset, epochs=1, batch_size=batch, lr=lr, seed=0,
                         device=torch.device("cpu"), max_steps=steps)
    return result.images_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    images = load_split(DataConfig(), "train").images
    torch.manual_seed(0)
    model = UNet(args.dim, (1, 2, 4), 1)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; UNet dim={args.dim} ({sum(p.numel() for p in model.parameters()):,} params), "
          f"batch {args.batch}, {args.steps} steps x {args.repeats} repeats")
    plain_loop(model, images, args.batch, 3, 1e-4)  # warm-up
    rates: dict[str, list[float]] = {"plain": [], "fedapp": []}
    for _ in range(args.repeats):
        rates["plain"].append(plain_loop(model, images, args.batch, args.steps, 1e-4))
        rates["fedapp"].append(fedapp_loop(model, images, args.batch, args.steps, 1e-4))
    best = {k: max(v) for k, v in rates.items()}
    for name, values in rates.items():
        print(f"{name:>7}: best {best[name]:7.1f} img/s   all {', '.join(f'{v:.1f}' for v in values)}")
    print(f"ratio fedapp/plain (best of each): {best['fedapp'] / best['plain']:.3f}")


if __name__ == "__main__":
    main()
