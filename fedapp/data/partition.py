"""Splitting one labelled pool over clients with flwr-datasets partitioners.

The pool is a small ``datasets.Dataset`` of (index, label) rows: partitioners only ever
see labels, and each client gets back indices into the decoded image tensor. The same
seed gives the same split on every node, so no node needs to be told its indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from datasets import Dataset, disable_progress_bars
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
    SizePartitioner,
)

from fedapp.config import DataConfig

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_MAX_DRAWS = 100
disable_progress_bars()


def _pool(labels: np.ndarray) -> Dataset:
    return Dataset.from_dict({"index": np.arange(len(labels)), "label": np.asarray(labels, dtype=np.int64)})


def dirichlet_sizes(n: int, num_partitions: int, alpha: float, min_size: int, seed: int) -> list[int]:
    """Client sizes ~ Dirichlet(α)·n, redrawn until every client has ``min_size`` examples."""
    if num_partitions * min_size >= n and num_partitions > 1:
        raise ValueError(
            f"quantity-skew: {n} examples leave no room for skew with {num_partitions} clients of "
            f">= {min_size} examples each; lower data.min-partition-size or use more data"
        )
    rng = np.random.default_rng(seed)
    for _ in range(_MAX_DRAWS):
        shares = rng.dirichlet([alpha] * num_partitions)
        sizes = np.floor(shares * n).astype(int)
        sizes[np.argmax(shares)] += n - sizes.sum()
        if sizes.min() >= min_size:
            return sizes.tolist()
    raise ValueError(
        f"quantity-skew: no Dirichlet(alpha={alpha}) draw in {_MAX_DRAWS} gave every one of "
        f"{num_partitions} clients >= {min_size} examples; raise data.alpha or lower data.min-partition-size"
    )


def build_partitioner(labels: np.ndarray, cfg: DataConfig, num_partitions: int, seed: int) -> Partitioner:
    """A flwr-datasets partitioner for ``cfg.partitioner``, with the pool already attached."""
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if num_partitions > len(labels):
        raise ValueError(f"{num_partitions} partitions but only {len(labels)} examples")
    if num_partitions * cfg.min_partition_size > len(labels):
        raise ValueError(
            f"data.min-partition-size = {cfg.min_partition_size} but {len(labels)} examples over "
            f"{num_partitions} clients give {len(labels) // num_partitions} each at most; "
            "lower data.min-partition-size or use more data"
        )
    pool = _pool(labels)
    scheme = cfg.partitioner
    partitioner: Partitioner
    if scheme == "iid":
        # IidPartitioner shards contiguously, so shuffle the pool first.
        partitioner, pool = IidPartitioner(num_partitions), pool.shuffle(seed=seed)
    elif scheme == "label-skew":
        partitioner = DirichletPartitioner(
            num_partitions,
            partition_by="label",
            alpha=cfg.alpha,
            min_partition_size=cfg.min_partition_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    elif scheme == "quantity-skew":
        sizes = dirichlet_sizes(len(labels), num_partitions, cfg.alpha, cfg.min_partition_size, seed)
        partitioner, pool = SizePartitioner(sizes), pool.shuffle(seed=seed)
    elif scheme == "pathological":
        num_classes = len(np.unique(labels))
        if cfg.classes_per_client > num_classes:
            raise ValueError(
                f"data.classes-per-client = {cfg.classes_per_client} but the data has {num_classes} classes"
            )
        partitioner = PathologicalPartitioner(
            num_partitions,
            partition_by="label",
            num_classes_per_partition=cfg.classes_per_client,
            class_assignment_mode="first-deterministic",
            shuffle=True,
            seed=seed,
        )
    else:  # pragma: no cover - the config's Literal rules this out
        raise ValueError(f"unknown partitioner {scheme!r}")
    partitioner.dataset = pool.flatten_indices()
    if scheme == "label-skew":  # flwr-datasets redraws until every client has min-partition-size
        try:
            partitioner.load_partition(0)
        except ValueError as err:
            raise ValueError(
                f"label-skew: no Dirichlet(alpha={cfg.alpha}) draw gave every one of {num_partitions} clients "
                f">= {cfg.min_partition_size} examples ({err}); raise data.alpha or lower data.min-partition-size"
            ) from None
    if scheme == "pathological":  # iid's equal shares and quantity-skew's redraws guarantee it already
        sizes = [len(partitioner.load_partition(pid)) for pid in range(num_partitions)]
        if min(sizes) < cfg.min_partition_size:
            raise ValueError(
                f"data.min-partition-size = {cfg.min_partition_size} but the pathological split gives "
                f"partition {int(np.argmin(sizes))} only {min(sizes)} examples; lower data.min-partition-size, "
                "raise data.classes-per-client or use more data"
            )
    return partitioner


def partition_indices(partitioner: Partitioner, partition_id: int) -> np.ndarray:
    """Indices into the pool that ``partition_id`` owns."""
    if not 0 <= partition_id < partitioner.num_partitions:
        raise ValueError(
            f"partition-id {partition_id} is outside [0, {partitioner.num_partitions}) "
            "(check the node's partition-id and num-partitions)"
        )
    return np.asarray(partitioner.load_partition(partition_id)["index"], dtype=np.int64)


def label_distribution_figure(partitioner: Partitioner, title: str,
                              class_names: Sequence[str] | None = None) -> Figure:
    """flwr-datasets' per-client label histogram, its legend naming each label's class.

    The pool's labels are plain integers (the partitioners only need those), so flwr-datasets
    would name them 0..9: ``class_names`` (``sources.CLASS_NAMES``) puts the names in their place.
    """
    import matplotlib

    matplotlib.use("Agg")
    from flwr_datasets.visualization import plot_label_distributions

    fig, _, _ = plot_label_distributions(
        partitioner, label_name="label", plot_type="bar", size_unit="absolute",
        legend=True, legend_title="class" if class_names else None, title=title, verbose_labels=False,
    )
    if class_names:
        for legend in fig.legends:
            for text in legend.get_texts():
                label = text.get_text()
                if label.isdigit() and int(label) < len(class_names):
                    text.set_text(class_names[int(label)])
    return fig


def plot_label_distribution(partitioner: Partitioner, path: Path, title: str,
                            class_names: Sequence[str] | None = None) -> Path:
    """Save :func:`label_distribution_figure` as a PNG."""
    import matplotlib.pyplot as plt

    fig = label_distribution_figure(partitioner, title, class_names)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
