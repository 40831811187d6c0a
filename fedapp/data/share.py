"""What one client trains and validates on: its partition of the (optionally capped) pool.

Every node derives the same pool and the same split from the config and seed alone.
Results are cached per process, so a ClientApp that handles many messages decodes and
partitions once, and, with ``data.cache``, on disk: a deployed SuperNode starts a fresh
process for every message, and the cached share spares it the decoding, the partitioning
and the import of flwr-datasets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedapp.config import DataConfig
from fedapp.data.sources import ImageData, data_cache_dir, load_split
from fedapp.files import atomic_torch_save, one_line

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

log = logging.getLogger(__name__)  # a child of fedapp's logger (fedapp.log)
CACHE_VERSION = 1  # bump when the split procedure changes, so old files are not reused


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
    from fedapp.data.partition import build_partitioner  # flwr-datasets: seconds to import

    pool = training_pool(cfg, seed)
    return build_partitioner(pool.labels.numpy(), cfg, num_partitions, seed)


@lru_cache(maxsize=8)
def local_data(cfg: DataConfig, seed: int, partition_id: int, num_partitions: int) -> LocalData:
    """The client's examples, with a seeded ``val-fraction`` held out for evaluation."""
    path = partition_cache_path(cfg, seed, partition_id, num_partitions) if cfg.cache else None
    cached = _read_cached(path) if path is not None else None
    if cached is not None:
        return cached
    share = split_partition(cfg, seed, partition_id, num_partitions)
    if path is not None:
        _write_cached(path, share)
    return share


def split_partition(cfg: DataConfig, seed: int, partition_id: int, num_partitions: int) -> LocalData:
    from fedapp.data.partition import partition_indices

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


def partition_cache_path(cfg: DataConfig, seed: int, partition_id: int, num_partitions: int) -> Path:
    """One file per (data config, seed, partition, count).

    The key is the config, not the image files: after replacing a data set's files in
    place, delete ``<data cache>/partitions/`` (or run with ``data.cache=false``).
    """
    setup = cfg.model_dump(exclude={"cache"})
    setup["root"] = str(Path(cfg.root).expanduser().resolve()) if cfg.root else ""
    key = json.dumps({"data": setup, "seed": seed, "pid": partition_id, "num": num_partitions,
                      "version": CACHE_VERSION}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return data_cache_dir() / "partitions" / f"{cfg.name}-{partition_id}of{num_partitions}-{digest}.pt"


def _read_cached(path: Path) -> LocalData | None:
    if not path.is_file():
        return None
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        share = LocalData(*(ImageData(raw[f"{s}_images"], raw[f"{s}_labels"], int(raw["num_classes"]))
                            for s in ("train", "val")))
    except Exception as err:  # a damaged file only costs a recompute  # noqa: BLE001
        warnings.warn(f"ignoring unreadable partition cache {path}: {one_line(err)}", stacklevel=3)
        return None
    log.info("partition from cache %s", path)
    return share


def _write_cached(path: Path, share: LocalData) -> None:
    blob = {"num_classes": share.train.num_classes}
    for name, part in (("train", share.train), ("val", share.val)):
        blob[f"{name}_images"], blob[f"{name}_labels"] = part.images, part.labels
    try:
        atomic_torch_save(blob, path)
    except OSError as err:
        warnings.warn(f"could not write partition cache {path}: {err}", stacklevel=3)
