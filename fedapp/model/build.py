"""Objects every job builds the same way from the config."""

from __future__ import annotations

import torch

from fedapp.config import FedConfig
from fedapp.data.pixels import image_shape
from fedapp.model.diffusion import Diffusion
from fedapp.model.unet import UNet, build_unet


def build_model(cfg: FedConfig, seed: int | None = None) -> UNet:
    """The UNet for the configured data; seeded, so every node can rebuild the initial model."""
    channels, side = image_shape(cfg.data)
    if seed is not None:
        torch.manual_seed(seed)
    return build_unet(cfg.model.dim, cfg.model.mults, channels, side)


def build_diffusion(cfg: FedConfig) -> Diffusion:
    return Diffusion.from_config(cfg.diffusion)
