"""Checkpoints that rebuild their model and carry what a resume needs.

A checkpoint holds the full resolved config (so ``build_model`` can rebuild the UNet),
the round it closes, the global weights, their EMA when the recipe keeps one (the weights
samples use; ``fedapp.train.ema.ema_state``) and any extra state (counters, metrics, RNG).
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
    ema: dict[str, Any] | None = None,
) -> Path:
    payload = {
        "format": FORMAT_VERSION,
        "config": cfg.flat(),
        "round": server_round,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }
    if ema is not None:
        payload["ema"] = ema
    return atomic_torch_save(payload, path)


def load_checkpoint(path: Path, device: str | torch.device = "cpu",
                    sampling: bool = True) -> tuple[nn.Module, FedConfig, dict[str, Any]]:
    """(model with weights loaded, its config, the raw payload).

    ``sampling``: the EMA weights where the checkpoint has them (what the run sampled and
    scored with); else, or with ``sampling=False``, the trained weights.
    """
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
        ema = payload.get("ema") if sampling else None
        model.load_state_dict(ema["weights"] if ema is not None else payload["model"])
    except (ConfigError, RuntimeError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: weights or config do not fit this fedapp version ({one_line(err, with_type=True)})") from None
    return model.to(device), cfg, payload
