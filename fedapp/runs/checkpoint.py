"""Checkpoints that rebuild their model and carry what a resume needs.

A checkpoint holds the full resolved config (so ``build_model`` can rebuild the UNet),
the round it closes, the global weights and any extra state (counters, metrics, RNG).
Writes are atomic: a crash mid-write never leaves a truncated file under the real name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedapp.config import ConfigError, FedConfig, parse_config
from fedapp.files import atomic_torch_save, one_line
from fedapp.model.build import build_model

FORMAT_VERSION = 1


def save_checkpoint(
    path: Path,
    cfg: FedConfig,
    server_round: int,
    model: nn.Module,
    extra: dict[str, Any] | None = None,
) -> Path:
    payload = {
        "format": FORMAT_VERSION,
        "config": cfg.flat(),
        "round": server_round,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }
    return atomic_torch_save(payload, path)


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, FedConfig, dict[str, Any]]:
    """(model with weights loaded, its config, the raw payload)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"{path} is not a readable fedapp checkpoint ({one_line(err, with_type=True)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a fedapp checkpoint of format {FORMAT_VERSION}")
    try:
        cfg = parse_config(payload["config"])
        model = build_model(cfg)
        model.load_state_dict(payload["model"])
    except (ConfigError, RuntimeError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: weights or config do not fit this fedapp version ({one_line(err, with_type=True)})") from None
    return model.to(device), cfg, payload
