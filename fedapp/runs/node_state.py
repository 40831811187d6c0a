"""A node's own model, kept on the node's disk between rounds.

On a deployment every message starts a fresh ClientApp process, so parts a client keeps
private (ULatDec's encoder, UDec's encoder and bottleneck, CollaFuse's whole model) must
outlive the process. They live under ``<node-state-dir>/run-<run id>/partition-<id>/``:
keyed by partition, not by Flower's node id, so a restarted SuperNode finds them again,
and by the run a resumed run continues (the server names it), so a resume does too.

Two of each kind are kept, the newest and the one before, because a server that resumes
from round R may meet nodes that already trained round R+1: each round starts from the
newest state of an earlier round, so the resumed round repeats exactly what the lost one
did. The kinds: ``model`` (the own model, and its EMA when the recipe keeps one),
``optimizer`` (the client's Adam state when ``train.optimizer-state = "persist"``), and with
``transport.payload = "delta"`` the ``transport-reference`` (by version, not round) and the
``transport-residual`` (error feedback), and with DP-SGD the client's ``dp-sgd-account``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fedapp.files import atomic_torch_save

STATE_DIR_ENV = "FEDAPP_NODE_STATE_DIR"
MODEL = "model"
OPTIMIZER = "optimizer"
REFERENCE = "transport-reference"  # its "round" is the reference version
RESIDUAL = "transport-residual"
DP_SGD_ACCOUNT = "dp-sgd-account"
MODEL_FILE = f"{MODEL}.pt"


def state_root(configured: str = "") -> Path:
    """``train.node-state-dir``, else $FEDAPP_NODE_STATE_DIR, else ~/.cache/fedapp/nodes."""
    raw = configured or os.environ.get(STATE_DIR_ENV, "") or "~/.cache/fedapp/nodes"
    return Path(raw).expanduser()


def node_dir(root: Path, run_id: int, partition_id: int) -> Path:
    return root / f"run-{run_id}" / f"partition-{partition_id}"


def _load(path: Path) -> dict[str, object] | None:
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def _slots(directory: Path, kind: str) -> tuple[Path, Path]:
    return directory / f"{kind}.pt", directory / f"{kind}-previous.pt"


def save_node_round(directory: Path, kind: str, payload: dict[str, object], partition_id: int,
                    server_round: int) -> Path:
    """The newest state of ``kind``; the one it replaces is kept as the previous if it is from an earlier round."""
    newest, previous = _slots(directory, kind)
    current = _load(newest)
    if current is not None and int(current["round"]) < server_round:  # type: ignore[call-overload]
        os.replace(newest, previous)
    return atomic_torch_save({**payload, "partition-id": partition_id, "round": server_round}, newest)


def load_node_round(directory: Path, kind: str, upto: int | None = None) -> dict[str, object] | None:
    """The node's newest saved state of ``kind`` of a round <= ``upto`` (any round without it), or None."""
    for path in _slots(directory, kind):
        payload = _load(path)
        if payload is not None and (upto is None or int(payload["round"]) <= upto):  # type: ignore[call-overload]
            return payload
    return None


def save_node_model(directory: Path, state: dict[str, torch.Tensor], partition_id: int, server_round: int,
                    ema: dict[str, object] | None = None) -> Path:
    """The own model (and its EMA, from ``fedapp.train.ema.ema_state``) after ``server_round``."""
    payload: dict[str, object] = {"model": {k: v.detach().cpu() for k, v in state.items()}}
    if ema is not None:
        payload["ema"] = ema
    return save_node_round(directory, MODEL, payload, partition_id, server_round)


def load_node_model(directory: Path, upto: int | None = None) -> dict[str, object] | None:
    return load_node_round(directory, MODEL, upto)


def save_node_file(directory: Path, name: str, payload: dict[str, object]) -> Path:
    """Other state a node keeps between messages (CollaFuse's audit images), written atomically."""
    return atomic_torch_save(payload, directory / name)


def load_node_file(directory: Path, name: str) -> dict[str, object] | None:
    return _load(directory / name)


def sampling_weights(payload: dict[str, object]) -> dict[str, torch.Tensor]:
    """The weights a node's model samples with: its EMA when it keeps one, else the trained weights."""
    ema = payload.get("ema")
    return ema["weights"] if isinstance(ema, dict) else payload["model"]  # type: ignore[return-value]


def collect_node_models(root: Path, run_id: int) -> dict[int, dict[str, torch.Tensor]]:
    """Every node's newest model of a run that this machine can see (its sampling weights), by partition id."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for path in sorted((root / f"run-{run_id}").glob(f"partition-*/{MODEL_FILE}")):
        payload = torch.load(path, map_location="cpu", weights_only=True)
        out[int(payload["partition-id"])] = sampling_weights(payload)
    return out
