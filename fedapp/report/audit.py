"""``fedapp audit RUN``: the membership inference attack of ``fedapp.eval.membership`` on a run's final model(s).

Each client is audited on the model its images trained: its own model in a personalized run
(ULatDec, UDec), else the global one. Members are that client's training images, rebuilt from
the run's config and seed as its node drew them; non-members the same held-out test images for
every client.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from fedapp.data.share import local_data
from fedapp.data.sources import load_split
from fedapp.eval.membership import loss_attack, per_image_loss
from fedapp.model.build import build_diffusion
from fedapp.protocol.methods import is_personalized
from fedapp.runs.checkpoint import load_checkpoint


def audit_run(checkpoint: Path, *, num_partitions: int = 0, members: int = 500, nonmembers: int = 500,
              draws: int = 8, seed: int = 0, max_timestep: int = 0,
              device: torch.device | None = None) -> list[dict[str, object]]:
    """One row per client (ROC AUC, TPR at 1 % FPR, counts); ``checkpoint``: a ``final.pt`` or round checkpoint."""
    device = device or torch.device("cpu")
    model, cfg, payload = load_checkpoint(checkpoint, device=device)
    method = cfg.strategy.name
    if method == "collafuse":
        raise ValueError("the audit covers models of the whole chain; a CollaFuse client's own model "
                         "denoises only below the cut")
    clients: dict[int, dict[str, torch.Tensor]] = payload["extra"].get("clients") or {}
    if is_personalized(method) and not clients:
        raise ValueError(f"{checkpoint} is a {method} run without its clients' models (the nodes' disks were "
                         "not visible to the server)")
    count = num_partitions or cfg.data.num_partitions or len(clients)
    if not count:
        raise ValueError(f"{checkpoint}: the run's number of partitions is not recorded; pass --num-partitions")
    diffusion = build_diffusion(cfg)
    test = load_split(cfg.data, "test")
    pick = np.random.default_rng([seed, 1]).permutation(len(test))[:nonmembers]
    outsiders = test.images[torch.from_numpy(np.sort(pick))]
    outsider_loss: dict[int, torch.Tensor] = {}
    rows: list[dict[str, object]] = []
    for pid in range(count):
        own = clients.get(pid) if is_personalized(method) else None
        if is_personalized(method) and own is None:
            continue
        scored = model
        if own is not None:
            scored = copy.deepcopy(model)
            scored.load_state_dict(own)
        train = local_data(cfg.data, cfg.seed, pid, count).train.images
        chosen = np.random.default_rng([seed, 2, pid]).permutation(len(train))[:members]
        kwargs = {"draws": draws, "seed": seed, "device": device, "max_timestep": max_timestep}
        inside = per_image_loss(scored, diffusion, train[torch.from_numpy(np.sort(chosen))], **kwargs)
        key = pid if own is not None else -1  # the global model scores the outsiders once
        if key not in outsider_loss:
            outsider_loss[key] = per_image_loss(scored, diffusion, outsiders, **kwargs)
        result = loss_attack(inside, outsider_loss[key])
        rows.append({"client": pid, "model": "own" if own is not None else "global", **result.row()})
    return rows
