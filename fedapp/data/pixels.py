"""Pixels as the model sees them: uint8 on disk and in memory, float [-1, 1] per batch on the device.

Kept apart from the loaders, so the model, training, sampling and evaluation need no data source.
"""

from __future__ import annotations

import torch

from fedapp.config import DataConfig

NATIVE_SHAPES: dict[str, tuple[int, int]] = {
    "fashion-mnist": (1, 28),
    "cifar10": (3, 32),
    "celeba": (3, 64),
    "folder": (3, 64),
}


def image_shape(cfg: DataConfig) -> tuple[int, int]:
    """``(channels, side)`` without touching the disk, so models can be built (e.g. on
    the server) before, or without, loading any data."""
    channels, side = NATIVE_SHAPES[cfg.name]
    return channels, (cfg.image_size if cfg.image_size > 0 else side)


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1], the range DDPM noise is added in; done per
    batch (ideally on the device) so the dataset stays uint8."""
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 tensor, got {images_uint8.dtype}")
    return images_uint8.to(torch.float32).div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8, clamped: samples drift outside [-1, 1] and must still
    save and score as valid images. Exact inverse of :func:`to_model_range`."""
    scaled = x.detach().to(torch.float32).clamp(-1.0, 1.0).add(1.0).mul_(127.5)
    return scaled.round_().to(torch.uint8)
