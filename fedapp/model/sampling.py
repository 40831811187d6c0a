"""Drawing batches of images from a trained model."""

from __future__ import annotations

import torch
from torch import nn

from fedapp.model.diffusion import Diffusion, Sampler


def generate(
    model: nn.Module,
    diffusion: Diffusion,
    n: int,
    shape: tuple[int, int],
    *,
    kind: Sampler = "ddim",
    steps: int | None = 50,
    seed: int = 0,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    progress: bool = False,
    eta: float = 0.0,
) -> torch.Tensor:
    """``n`` samples in [-1, 1] of (channels, side) = ``shape``; seeded, on the CPU at the end."""
    channels, side = shape
    device = torch.device(device)
    model = model.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for first in range(0, n, batch_size):
        count = min(batch_size, n - first)
        x = diffusion.prior((count, channels, side, side), gen, device)
        x = diffusion.sample(model, x, kind=kind, steps=steps, generator=gen, progress=progress, eta=eta)
        out.append(x.cpu())
    return torch.cat(out) if out else torch.empty((0, channels, side, side))
