"""A node's own model, kept on the node's disk between rounds.

On a deployment every message starts a fresh ClientApp process, so parts a client keeps
private (ULatDec's encoder, UDec's encoder and bottleneck) must outlive the process.
They live under ``<node-state-dir>/run-<run id>/node-<node id>/``, written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fedapp.checkpoint import atomic_torch_save

STATE_DIR_ENV = "FEDAPP_NODE_STATE_DIR"
MODEL_FILE = "model.pt"


def state_root(configured: str = "") -> Path:
    """``train.node-state-dir``, else $FEDAPP_NODE_STATE_DIR, else ~/.cache/fedapp/nodes."""
    raw = configured or os.environ.get(STATE_DIR_ENV, "") or "~/.cache/fedapp/nodes"
    return Path(raw).expanduser()


def node_dir(root: Path, run_id: int, node_id: int) -> Path:
    return root / f"run-{run_id}" / f"node-{node_id}"


def save_node_model(directory: Path, state: dict[str, torch.Tensor], partition_id: int, server_round: int) -> Path:
    payload = {"model": {k: v.detach().cpu() for k, v in state.items()},
               "partition-id": partition_id, "round": server_round}
    return atomic_torch_save(payload, directory / MODEL_FILE)


def load_node_model(directory: Path) -> dict[str, object] | None:
    """The node's last saved model payload, or None on its first round."""
    path = directory / MODEL_FILE
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def save_node_file(directory: Path, name: str, payload: dict[str, object]) -> Path:
    """Other state a node keeps between messages (CollaFuse's audit images), written atomically."""
    return atomic_torch_save(payload, directory / name)


def load_node_file(directory: Path, name: str) -> dict[str, object] | None:
    path = directory / name
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def collect_node_models(root: Path, run_id: int) -> dict[int, dict[str, torch.Tensor]]:
    """Every node's model of a run that this machine can see, by partition id (simulation)."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for path in sorted((root / f"run-{run_id}").glob(f"node-*/{MODEL_FILE}")):
        payload = torch.load(path, map_location="cpu", weights_only=True)
        out[int(payload["partition-id"])] = payload["model"]
    return out
