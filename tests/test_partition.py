"""Tests for fedapp.data.partition (the four split schemes over synthetic labels) and
fedapp.data.share (a client's train/val share of the capped pool, from fake IDX files)."""

from __future__ import annotations

import gzip
import struct
import warnings
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
import torch

from fedapp.config import DataConfig
from fedapp.data import sources as datasets
from fedapp.data.partition import (
    build_partitioner,
    dirichlet_sizes,
    label_distribution_figure,
    partition_indices,
    plot_label_distribution,
)
from fedapp.data.share import LocalData, local_data, partition_cache_path, pool_partitioner, training_pool
from fedapp.data.sources import CLASS_NAMES, load_split

N_EXAMPLES = 2000
N_CLASSES = 10
N_CLIENTS = 5
SCHEMES = ["iid", "label-skew", "quantity-skew", "pathological"]
COVERING = ["iid", "label-skew", "quantity-skew"]  # pathological may leave classes unused


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return np.random.default_rng(1234).integers(0, N_CLASSES, size=N_EXAMPLES)


def config(scheme: str, **kwargs: object) -> DataConfig:
    return DataConfig(partitioner=scheme, **kwargs)  # type: ignore[arg-type]


def split(labels: np.ndarray, cfg: DataConfig, seed: int,
          num_partitions: int = N_CLIENTS) -> list[np.ndarray]:
    with warnings.catch_warnings():
        # PathologicalPartitioner warns about classes no client drew.
        warnings.simplefilter("ignore", UserWarning)
        partitioner = build_partitioner(labels, cfg, num_partitions, seed)
        return [partition_indices(partitioner, pid) for pid in range(num_partitions)]


def histogram(labels: np.ndarray) -> np.ndarray:
    return np.bincount(labels, minlength=N_CLASSES) / len(labels)


def tv_from_global(labels: np.ndarray, idx: np.ndarray) -> float:
    """Total-variation distance of a client's label histogram from the global one."""
    return 0.5 * float(np.abs(histogram(labels[idx]) - histogram(labels)).sum())


# ----------------------------------------------------------------------------- all schemes


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partitions_are_disjoint_and_valid(labels: np.ndarray, scheme: str) -> None:
    parts = split(labels, config(scheme), seed=0)
    assert len(parts) == N_CLIENTS
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)), "an index is in two partitions"
    assert joined.min() >= 0 and joined.max() < N_EXAMPLES
    assert all(p.dtype == np.int64 for p in parts)
    assert all(len(p) > 0 for p in parts)


@pytest.mark.parametrize("scheme", COVERING)
def test_partitions_cover_every_index_once(labels: np.ndarray, scheme: str) -> None:
    joined = np.concatenate(split(labels, config(scheme), seed=0))
    np.testing.assert_array_equal(np.sort(joined), np.arange(N_EXAMPLES))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_same_seed_same_split_different_seed_different(labels: np.ndarray, scheme: str) -> None:
    cfg = config(scheme)
    first = split(labels, cfg, seed=7)
    second = split(labels.copy(), cfg, seed=7)  # a separate build, as on another node
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    other = split(labels, cfg, seed=8)
    assert any(
        len(a) != len(b) or not np.array_equal(a, b) for a, b in zip(first, other)
    ), "a different seed gave the same split"


# ----------------------------------------------------------------------------- iid


def test_iid_balanced_sizes_and_labels(labels: np.ndarray) -> None:
    parts = split(labels, config("iid"), seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    for idx in parts:
        assert tv_from_global(labels, idx) < 0.15

    # Uneven count: sizes still differ by at most one.
    odd = split(labels[:1003], config("iid"), seed=0, num_partitions=4)
    assert sorted(len(p) for p in odd) == [250, 251, 251, 251]


def test_iid_is_shuffled_not_contiguous(labels: np.ndarray) -> None:
    parts = split(labels, config("iid"), seed=0)
    first = np.sort(parts[0])
    assert not np.array_equal(first, np.arange(len(first)))


# ----------------------------------------------------------------------------- label skew


def test_label_skew_is_skewed(labels: np.ndarray) -> None:
    iid = split(labels, config("iid"), seed=0)
    skew = split(labels, config("label-skew", alpha=0.1, min_partition_size=10), seed=0)
    iid_tv = np.mean([tv_from_global(labels, idx) for idx in iid])
    skew_tv = np.mean([tv_from_global(labels, idx) for idx in skew])
    assert skew_tv > 0.3
    assert skew_tv > 4 * iid_tv
    assert all(len(idx) >= 10 for idx in skew)


def test_label_skew_alpha_orders_skew(labels: np.ndarray) -> None:
    """Larger alpha, closer to IID (averaged over a few seeds to keep it robust)."""
    def mean_tv(alpha: float) -> float:
        return float(np.mean([
            tv_from_global(labels, idx)
            for seed in range(3)
            for idx in split(labels, config("label-skew", alpha=alpha), seed=seed)
        ]))

    assert mean_tv(100.0) < mean_tv(0.1) / 2


# ----------------------------------------------------------------------------- quantity skew


def test_quantity_skew_sizes_vary_labels_stay_iid(labels: np.ndarray) -> None:
    parts = split(labels, config("quantity-skew", alpha=0.5, min_partition_size=10), seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) / min(sizes) > 2
    assert min(sizes) >= 10
    assert sizes == dirichlet_sizes(N_EXAMPLES, N_CLIENTS, 0.5, 10, 0)
    # Labels are IID: big clients match the global histogram closely.
    for idx in parts:
        if len(idx) >= 200:
            assert tv_from_global(labels, idx) < 0.12
    weighted = sum(len(idx) * tv_from_global(labels, idx) for idx in parts) / N_EXAMPLES
    assert weighted < 0.1


@pytest.mark.parametrize("n, k, alpha, min_size, seed",
                         [(2000, 5, 0.5, 10, 0), (100, 10, 0.5, 1, 3), (80, 5, 5.0, 10, 1)])
def test_dirichlet_sizes(n: int, k: int, alpha: float, min_size: int, seed: int) -> None:
    sizes = dirichlet_sizes(n, k, alpha, min_size, seed)
    assert len(sizes) == k
    assert sum(sizes) == n
    assert min(sizes) >= min_size
    assert sizes == dirichlet_sizes(n, k, alpha, min_size, seed)


def test_dirichlet_sizes_impossible_minimum() -> None:
    with pytest.raises(ValueError, match="11 clients"):
        dirichlet_sizes(100, 11, 0.5, 10, 0)


def test_quantity_skew_gives_up_with_clear_message() -> None:
    """A tiny alpha never gives every client the minimum; the error says what to change."""
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_sizes(2000, 20, 0.01, 90, 0)


# ----------------------------------------------------------------------------- pathological


def test_pathological_two_classes_per_client(labels: np.ndarray) -> None:
    parts = split(labels, config("pathological", classes_per_client=2), seed=0)
    for idx in parts:
        assert len(np.unique(labels[idx])) == 2


def test_pathological_one_class_per_client(labels: np.ndarray) -> None:
    parts = split(labels, config("pathological", classes_per_client=1), seed=3)
    for idx in parts:
        assert len(np.unique(labels[idx])) == 1


def test_pathological_too_many_classes(labels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="classes-per-client"):
        build_partitioner(labels, config("pathological", classes_per_client=11), N_CLIENTS, 0)


# ----------------------------------------------------------------------------- errors, plot


@pytest.mark.parametrize("pid", [-1, N_CLIENTS, N_CLIENTS + 3])
def test_partition_id_out_of_range(labels: np.ndarray, pid: int) -> None:
    partitioner = build_partitioner(labels, config("iid"), N_CLIENTS, 0)
    with pytest.raises(ValueError, match="partition-id") as info:
        partition_indices(partitioner, pid)
    assert str(pid) in str(info.value)


@pytest.mark.parametrize("num_partitions", [0, N_EXAMPLES + 1])
def test_bad_num_partitions(labels: np.ndarray, num_partitions: int) -> None:
    with pytest.raises(ValueError):
        build_partitioner(labels, config("iid"), num_partitions, 0)


def test_plot_label_distribution(labels: np.ndarray, tmp_path: Path) -> None:
    partitioner = build_partitioner(labels, config("label-skew"), N_CLIENTS, 0)
    out = plot_label_distribution(partitioner, tmp_path / "plots" / "labels.png", "label skew")
    assert out == tmp_path / "plots" / "labels.png"
    data = out.read_bytes()
    assert len(data) > 1000
    assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_label_distribution_legend_names_the_classes(labels: np.ndarray) -> None:
    """Fashion-MNIST's legend reads T-shirt/top ... Ankle boot, not 0..9; without names it keeps the labels."""
    import matplotlib.pyplot as plt

    partitioner = build_partitioner(labels, config("label-skew"), N_CLIENTS, 0)
    names = CLASS_NAMES["fashion-mnist"]
    assert len(names) == N_CLASSES and names[0] == "T-shirt/top" and names[9] == "Ankle boot"

    def legend_texts(class_names: tuple[str, ...] | None) -> set[str]:
        fig = label_distribution_figure(partitioner, "label skew", class_names)
        (legend,) = fig.legends
        texts = {t.get_text() for t in legend.get_texts()}
        plt.close(fig)
        return texts

    assert legend_texts(names) == set(names)
    assert legend_texts(None) == {str(c) for c in range(N_CLASSES)}


# ----------------------------------------------------------------------------- local_data

FAKE_TRAIN = 300


def _write_idx(path: Path, arr: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


def write_fake_fmnist(folder: Path, n_train: int = FAKE_TRAIN, n_test: int = 20) -> None:
    """IDX files whose images encode their own index (pixel 0 = i // 256, pixel 1 = i % 256)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.zeros((n, 4, 4), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n) // 256
        images[:, 0, 1] = np.arange(n) % 256
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images, 2051)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz",
                   rng.integers(0, 10, size=n, dtype=np.uint8), 2049)


def image_ids(images: torch.Tensor) -> list[int]:
    return (images[:, 0, 0, 0].long() * 256 + images[:, 0, 0, 1].long()).tolist()


@pytest.fixture
def fake_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FEDAPP_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    root = tmp_path / "fmnist"
    write_fake_fmnist(root)

    def clear() -> None:
        local_data.cache_clear()
        pool_partitioner.cache_clear()
        load_split.cache_clear()

    clear()
    yield root
    clear()


@pytest.mark.parametrize("scheme", ["iid", "quantity-skew"])
def test_local_data_covers_capped_pool(fake_root: Path, scheme: str) -> None:
    cfg = DataConfig(root=str(fake_root), download=False, max_train_examples=200,
                     val_fraction=0.2, partitioner=scheme, min_partition_size=5)  # type: ignore[arg-type]
    seed, clients = 3, 4

    pool_ids = image_ids(training_pool(cfg, seed).images)
    assert len(pool_ids) == 200 == len(set(pool_ids))
    assert set(pool_ids) <= set(range(FAKE_TRAIN))
    assert pool_ids != list(range(200)), "the cap is a seeded draw, not the first N"

    seen: list[int] = []
    for pid in range(clients):
        share = local_data(cfg, seed, pid, clients)
        train, val = image_ids(share.train.images), image_ids(share.val.images)
        assert not set(train) & set(val)
        own = len(train) + len(val)
        assert len(val) == max(1, round(0.2 * own))
        assert share.train.num_classes == share.val.num_classes == 10
        seen += train + val
    assert len(seen) == len(set(seen)), "two clients share an image"
    assert sorted(seen) == sorted(pool_ids)


def test_local_data_deterministic_across_processes(fake_root: Path) -> None:
    """Clearing the caches mimics another node: the same config and seed give the same split."""
    cfg = DataConfig(root=str(fake_root), download=False, max_train_examples=120,
                     val_fraction=0.1, partitioner="label-skew")
    first = local_data(cfg, 0, 1, 3)
    assert local_data(cfg, 0, 1, 3) is first  # cached within the process
    local_data.cache_clear()
    pool_partitioner.cache_clear()
    load_split.cache_clear()
    again = local_data(cfg, 0, 1, 3)
    assert torch.equal(first.train.images, again.train.images)
    assert torch.equal(first.val.images, again.val.images)
    assert torch.equal(first.train.labels, again.train.labels)
    other_seed = local_data(cfg, 1, 1, 3)
    assert image_ids(other_seed.train.images) != image_ids(first.train.images)


def test_local_data_no_cap_and_no_val(fake_root: Path) -> None:
    cfg = DataConfig(root=str(fake_root), download=False, max_train_examples=0,
                     val_fraction=0.0)
    shares = [local_data(cfg, 0, pid, 3) for pid in range(3)]
    assert all(len(s.val) == 0 for s in shares)
    ids = sorted(i for s in shares for i in image_ids(s.train.images))
    assert ids == list(range(FAKE_TRAIN))
    # labels follow their images
    full = load_split(cfg, "train")
    for s in shares:
        for img_id, label in zip(image_ids(s.train.images), s.train.labels.tolist()):
            assert full.labels[img_id].item() == label


# ----------------------------------------------------------------------------- disk cache
def _same(a: LocalData, b: LocalData) -> bool:
    return all(torch.equal(getattr(a, s).images, getattr(b, s).images)
               and torch.equal(getattr(a, s).labels, getattr(b, s).labels) for s in ("train", "val"))


def test_a_new_process_reads_the_share_from_disk_and_gets_the_same_data(fake_root: Path) -> None:
    cfg = DataConfig(root=str(fake_root), download=False, partitioner="label-skew", min_partition_size=5)
    first = local_data(cfg, 3, 1, 3)
    path = partition_cache_path(cfg, 3, 1, 3)
    assert path.is_file() and path.is_relative_to(fake_root.parent / "cache" / "partitions")
    local_data.cache_clear()
    pool_partitioner.cache_clear()
    with patch("fedapp.data.share.split_partition", side_effect=AssertionError("recomputed")):
        again = local_data(cfg, 3, 1, 3)
    assert _same(first, again)
    # Every input of the split is in the key.
    others = {partition_cache_path(cfg, 4, 1, 3), partition_cache_path(cfg, 3, 2, 3),
              partition_cache_path(cfg, 3, 1, 4), partition_cache_path(cfg.model_copy(update={"alpha": 0.1}), 3, 1, 3)}
    assert path not in others and len(others) == 4
    assert partition_cache_path(cfg.model_copy(update={"cache": False}), 3, 1, 3) == path


def test_a_damaged_cache_file_is_recomputed_and_replaced(fake_root: Path) -> None:
    cfg = DataConfig(root=str(fake_root), download=False)
    first = local_data(cfg, 0, 0, 2)
    path = partition_cache_path(cfg, 0, 0, 2)
    path.write_bytes(b"truncated")
    local_data.cache_clear()
    with pytest.warns(UserWarning, match="unreadable partition cache"):
        again = local_data(cfg, 0, 0, 2)
    assert _same(first, again)
    local_data.cache_clear()
    assert _same(first, local_data(cfg, 0, 0, 2))  # rewritten: read back without a warning


def test_data_cache_false_writes_nothing(fake_root: Path) -> None:
    cfg = DataConfig(root=str(fake_root), download=False, cache=False)
    local_data(cfg, 0, 0, 2)
    assert not (fake_root.parent / "cache" / "partitions").exists()


@pytest.mark.parametrize("scheme", ["iid", "label-skew", "quantity-skew", "pathological"])
def test_min_partition_size_holds_for_every_scheme_or_is_refused(scheme: str) -> None:
    """20 images over 3 clients cannot give 10 each: refused by name, never lowered in silence."""
    few = np.arange(20) % 10
    with pytest.raises(ValueError, match=r"data.min-partition-size = 10"):
        split(few, config(scheme, min_partition_size=10), seed=0, num_partitions=3)
    parts = split(np.arange(300) % 10, config(scheme, min_partition_size=6), seed=0)
    assert min(len(p) for p in parts) >= 6


def test_pathological_and_label_skew_name_the_key_when_the_minimum_cannot_hold() -> None:
    labels = np.arange(200) % 10
    with pytest.raises(ValueError, match=r"pathological split gives partition \d only 20 examples"):
        build_partitioner(labels, config("pathological", classes_per_client=1, min_partition_size=30), 3, 0)
    with pytest.raises(ValueError, match=r"^label-skew: no Dirichlet\(alpha=0.1\) draw .* data.min-partition-size"):
        build_partitioner(labels, config("label-skew", alpha=0.1, min_partition_size=60), 3, 0)
