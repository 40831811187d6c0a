"""What one client trains and validates on: its partition of the (optionally capped) pool.

Every node derives the same pool and the same split from the config and seed alone.
Results are cached per process, so a ClientApp that handles many messages decodes and
partitions once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from flwr_datasets.partitioner import Partitioner

from fedapp.config import DataConfig
from fedapp.datasets import ImageData, load_split
from fedapp.partition import build_partitioner, partition_indices


@dataclass(frozen=True)
class LocalData:
    train: ImageData
    val: ImageData


def training_pool(cfg: DataConfig, seed: int) -> ImageData:
    """The training split, capped to ``max-train-examples`` by a seeded draw."""
    data = load_split(cfg, "train")
    if cfg.max_train_examples and cfg.max_train_examples < len(data):
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(len(data), cfg.max_train_examples, replace=False))
        data = data.subset(torch.from_numpy(keep))
    return data


@lru_cache(maxsize=4)
def pool_partitioner(cfg: DataConfig, seed: int, num_partitions: int) -> Partitioner:
    pool = training_pool(cfg, seed)
    return build_partitioner(pool.labels.numpy(), cfg, num_partitions, seed)


@lru_cache(maxsize=8)
def local_data(cfg: DataConfig, seed: int, partition_id: int, num_partitions: int) -> LocalData:
    """The client's examples, with a seeded ``val-fraction`` held out for evaluation."""
    pool = training_pool(cfg, seed)
    own = partition_indices(pool_partitioner(cfg, seed, num_partitions), partition_id)
    rng = np.random.default_rng([seed, partition_id])
    own = rng.permutation(own)
    n_val = int(round(len(own) * cfg.val_fraction))
    if cfg.val_fraction > 0 and len(own) >= 2:
        n_val = min(max(n_val, 1), len(own) - 1)
    val_idx, train_idx = np.sort(own[:n_val]), np.sort(own[n_val:])
    return LocalData(
        train=pool.subset(torch.from_numpy(train_idx)),
        val=pool.subset(torch.from_numpy(val_idx)),
    )
