"""Checkpoints that rebuild their model and carry what a resume needs.

A checkpoint holds the full resolved config (so ``build_model`` can rebuild the UNet),
the round it closes, the global weights and any extra state (counters, metrics, RNG).
Writes are atomic: a crash mid-write never leaves a truncated file under the real name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedapp.model.build import build_model
from fedapp.config import ConfigError, FedConfig, parse_config

FORMAT_VERSION = 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def atomic_torch_save(obj: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; keep the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
        raise ValueError(f"{path} is not a readable fedapp checkpoint ({_first_line(err)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a fedapp checkpoint of format {FORMAT_VERSION}")
    try:
        cfg = parse_config(payload["config"])
        model = build_model(cfg)
        model.load_state_dict(payload["model"])
    except (ConfigError, RuntimeError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: weights or config do not fit this fedapp version ({_first_line(err)})") from None
    return model.to(device), cfg, payload
