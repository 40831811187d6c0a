"""Sample grids on disk."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torchvision.utils import save_image


def save_grid(samples: torch.Tensor, path: Path, nrow: int | None = None) -> Path:
    """Write samples in [-1, 1] as one PNG grid, about square by default."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or max(1, int(math.ceil(math.sqrt(len(samples)))))
    images = ((samples.detach().float().cpu().clamp(-1, 1) + 1) / 2)
    save_image(images, str(path), nrow=nrow, padding=2, pad_value=1.0)
    return path
