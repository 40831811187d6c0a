"""Tests for fedapp.data.sources: tiny fake files in the real formats, plus the real
Debian Fashion-MNIST copy when the machine has it."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedapp.config import DataConfig
from fedapp.data import sources as datasets
from fedapp.data.pixels import image_shape, to_model_range, to_uint8
from fedapp.data.sources import (
    DatasetNotFoundError,
    ImageData,
    fashion_mnist_candidates,
    load_split,
)
from tests.support.markers import needs_real_fmnist

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test may see the real home cache, the real Debian copy, or an earlier
    test's decoded split."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEDAPP_DATA_DIR", str(cache))
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    load_split.cache_clear()
    yield cache
    load_split.cache_clear()


# ----------------------------------------------------------------------------- writers


def _idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_fmnist(folder: Path, n_train: int = 6, n_test: int = 4, side: int = 5,
                 gz: bool = True, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fake Fashion-MNIST IDX files; returns what was written per split."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, size=(n, side, side), dtype=np.uint8)
        labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        for stem, arr, magic in ((f"{prefix}-images-idx3-ubyte", images, 2051),
                                 (f"{prefix}-labels-idx1-ubyte", labels, 2049)):
            data = _idx_bytes(arr, magic)
            if gz:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / stem).write_bytes(data)
        written[split] = (images, labels)
    return written


def write_cifar(folder: Path, per_batch: int = 3) -> dict[str, tuple[np.ndarray, list[int]]]:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    parts: dict[str, list[tuple[np.ndarray, list[int]]]] = {"train": [], "test": []}
    names = [(f"data_batch_{i}", "train") for i in range(1, 6)] + [("test_batch", "test")]
    for name, split in names:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        with (folder / name).open("wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, fh)
        parts[split].append((data, labels))
    return {
        split: (np.concatenate([d for d, _ in p]), [lab for _, ls in p for lab in ls])
        for split, p in parts.items()
    }


def write_image(path: Path, size: tuple[int, int], color: tuple[int, int, int],
                fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


# ----------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("raw_layout", [False, True])
def test_fmnist_idx_round_trip(tmp_path: Path, gz: bool, raw_layout: bool) -> None:
    root = tmp_path / "data"
    folder = root / "FashionMNIST" / "raw" if raw_layout else root
    written = write_fmnist(folder, gz=gz)
    cfg = DataConfig(root=str(root), download=False)
    for split in ("train", "test"):
        data = load_split(cfg, split)
        images, labels = written[split]
        assert data.images.dtype == torch.uint8
        assert data.images.shape == (len(images), 1, 5, 5)
        assert data.images.is_contiguous()
        assert data.labels.dtype == torch.int64
        assert data.num_classes == 10
        assert len(data) == len(images)
        np.testing.assert_array_equal(data.images[:, 0].numpy(), images)
        np.testing.assert_array_equal(data.labels.numpy(), labels)


def test_fmnist_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             _isolated: Path) -> None:
    root, cache, debian = tmp_path / "root", _isolated, tmp_path / "debian"
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST_DIR", debian)
    root.mkdir()
    assert fashion_mnist_candidates(DataConfig(root=str(root), download=False)) == [root, root / "FashionMNIST" / "raw"]
    assert fashion_mnist_candidates(DataConfig(download=False)) == [cache / "FashionMNIST" / "raw", debian]

    # A different image side in each place tells which one was read.
    write_fmnist(debian, side=3)
    assert load_split(DataConfig(download=False), "test").images.shape[-1] == 3
    load_split.cache_clear()
    write_fmnist(cache / "FashionMNIST" / "raw", side=4)
    assert load_split(DataConfig(download=False), "test").images.shape[-1] == 4
    load_split.cache_clear()
    with pytest.raises(DatasetNotFoundError, match="not found; looked in: "):  # an empty root is not skipped
        load_split(DataConfig(root=str(root), download=False), "test")
    write_fmnist(root / "FashionMNIST" / "raw", side=6)
    assert load_split(DataConfig(root=str(root), download=False), "test").images.shape[-1] == 6
    load_split.cache_clear()
    write_fmnist(root, side=7)
    assert load_split(DataConfig(root=str(root), download=False), "test").images.shape[-1] == 7


def test_a_data_root_that_does_not_exist_is_an_error_not_a_fallback(tmp_path: Path, _isolated: Path) -> None:
    write_fmnist(_isolated / "FashionMNIST" / "raw", side=4)  # a copy that must not be used instead
    for name in ("fashion-mnist", "cifar10"):
        with pytest.raises(DatasetNotFoundError, match=r"^data.root = '.*/typo' does not exist or is not a folder"):
            load_split(DataConfig(name=name, root=str(tmp_path / "typo"), download=False), "train")


def test_fmnist_not_found_is_one_actionable_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    cfg = DataConfig(root=str(tmp_path / "empty"), download=False)
    with pytest.raises(DatasetNotFoundError) as info:
        load_split(cfg, "train")
    message = str(info.value)
    assert "\n" not in message
    assert "dataset-fashion-mnist" in message
    assert "data.download" in message
    assert "data.root" in message
    assert str(tmp_path / "empty") in message


def test_fmnist_download_failure_reason_in_message(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(kind: str, target: Path) -> None:
        raise OSError("no route to host\nsecond line")

    monkeypatch.setattr(datasets, "_torchvision_download", fail)
    with pytest.raises(DatasetNotFoundError) as info:
        load_split(DataConfig(root=str(tmp_path / "empty"), download=True), "train")
    message = str(info.value)
    assert "\n" not in message
    assert "no route to host second line" in message


def test_fmnist_download_is_read_from_raw_folder(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "dl"
    calls = []

    def fake(kind: str, target: Path) -> None:
        calls.append((kind, target))
        write_fmnist(target / "FashionMNIST" / "raw", side=9)

    monkeypatch.setattr(datasets, "_torchvision_download", fake)
    data = load_split(DataConfig(root=str(root), download=True), "train")
    assert calls == [("FashionMNIST", root)]
    assert data.images.shape == (6, 1, 9, 9)


@pytest.mark.parametrize("damage", ["magic", "truncated", "truncated-gzip"])
def test_fmnist_corrupt_file_is_named(tmp_path: Path, damage: str) -> None:
    write_fmnist(tmp_path, gz=damage == "truncated-gzip")
    stem = "train-images-idx3-ubyte"
    path = tmp_path / (stem + ".gz" if damage == "truncated-gzip" else stem)
    raw = path.read_bytes()
    if damage == "magic":
        path.write_bytes(struct.pack(">I", 1234) + raw[4:])
    else:
        path.write_bytes(raw[: len(raw) - 7])
    with pytest.raises(ValueError) as info:
        load_split(DataConfig(root=str(tmp_path), download=False), "train")
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_fmnist_image_size_resizes(tmp_path: Path) -> None:
    write_fmnist(tmp_path, side=28)
    data = load_split(DataConfig(root=str(tmp_path), download=False, image_size=32), "train")
    assert data.images.shape == (6, 1, 32, 32)
    assert data.images.dtype == torch.uint8 and data.images.is_contiguous()


@needs_real_fmnist
def test_real_debian_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST_DIR", REAL_FMNIST)
    data = load_split(DataConfig(download=False), "test")
    assert data.images.shape == (10000, 1, 28, 28)
    assert data.images.dtype == torch.uint8
    assert data.num_classes == 10
    assert torch.bincount(data.labels, minlength=10).tolist() == [1000] * 10
    assert load_split(DataConfig(download=False), "test") is data  # decoded once


# ----------------------------------------------------------------------------- CIFAR-10


def test_cifar10_pickles(tmp_path: Path) -> None:
    written = write_cifar(tmp_path / "cifar-10-batches-py")
    cfg = DataConfig(name="cifar10", root=str(tmp_path), download=False)
    for split, n in (("train", 15), ("test", 3)):
        data = load_split(cfg, split)
        assert data.images.shape == (n, 3, 32, 32)
        assert data.images.dtype == torch.uint8 and data.images.is_contiguous()
        assert data.num_classes == 10
        flat, labels = written[split]
        np.testing.assert_array_equal(data.images.reshape(n, -1).numpy(), flat)
        assert data.labels.tolist() == labels


def test_cifar10_not_found(tmp_path: Path) -> None:
    cfg = DataConfig(name="cifar10", root=str(tmp_path), download=False)
    with pytest.raises(DatasetNotFoundError) as info:
        load_split(cfg, "test")
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "data.root" in message and "data.download" in message


# ----------------------------------------------------------------------------- CelebA


def test_celeba_split_crop_and_disk_cache(tmp_path: Path, _isolated: Path) -> None:
    folder = tmp_path / "data" / "celeba"
    img_dir = folder / "img_align_celeba"
    parts = [0, 0, 1, 2, 0, 2]
    colors = [(10 * i, 200 - 10 * i, 7 * i) for i in range(len(parts))]
    lines = []
    for i, (part, color) in enumerate(zip(parts, colors), 1):
        write_image(img_dir / f"{i:06d}.jpg", (178, 218), color, "JPEG")
        lines.append(f"{i:06d}.jpg {part}")
    (folder / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(name="celeba", root=str(tmp_path / "data"), download=False)

    assert image_shape(cfg) == (3, 64)
    train = load_split(cfg, "train")
    test = load_split(cfg, "test")
    assert train.images.shape == (3, 3, 64, 64) and test.images.shape == (2, 3, 64, 64)
    assert train.images.dtype == torch.uint8 and train.images.is_contiguous()
    assert train.num_classes == 1 and train.labels.tolist() == [0, 0, 0]
    # Solid colours survive crop + resize (JPEG is lossy: allow a few levels).
    mean = test.images.float().mean(dim=(2, 3))
    expected = torch.tensor([colors[3], colors[5]], dtype=torch.float32)
    assert torch.allclose(mean, expected, atol=4)
    assert len(list((_isolated / "decoded").glob("celeba-*.npy"))) == 2

    for jpg in img_dir.glob("*.jpg"):
        jpg.unlink()
    load_split.cache_clear()
    again = load_split(cfg, "train")
    assert torch.equal(again.images, train.images)

    # A size that was never cached must decode, and the missing file is named.
    with pytest.raises(ValueError, match="000004.jpg"):
        load_split(DataConfig(name="celeba", root=str(tmp_path / "data"), image_size=16),
                   "test")


def test_celeba_missing_partition(tmp_path: Path) -> None:
    write_image(tmp_path / "celeba" / "img_align_celeba" / "000001.jpg", (178, 218),
                (1, 2, 3), "JPEG")
    with pytest.raises(DatasetNotFoundError) as info:
        load_split(DataConfig(name="celeba", root=str(tmp_path)), "train")
    assert "list_eval_partition.txt" in str(info.value)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- folder


def test_folder_class_subfolders(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for i in range(6):
        write_image(root / "cats" / f"c{i}.png", (40, 30), (200, 0, 0))
    for i in range(4):
        write_image(root / "dogs" / "deeper" / f"d{i}.jpg", (30, 50), (0, 0, 200))
    cfg = DataConfig(name="folder", root=str(root))
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert train.num_classes == test.num_classes == 2
    assert len(train) == 9 and len(test) == 1
    both = ImageData(torch.cat([train.images, test.images]),
                     torch.cat([train.labels, test.labels]), 2)
    assert sorted(both.labels.tolist()) == [0] * 6 + [1] * 4
    assert both.images.shape[1:] == (3, 64, 64)
    red = both.images[both.labels == 0].float().mean(dim=(0, 2, 3))
    assert red[0] > 190 and red[2] < 10  # cats (label 0) are red


def test_folder_flat_split_is_disjoint_and_deterministic(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "flat"
    for i in range(25):  # colour encodes the file index, to tell images apart
        write_image(root / f"{i:02d}.png", (20 + i, 24), (i * 10, 0, 255 - i * 10))
    write_image(root / "ignored.txt.gif", (8, 8), (0, 0, 0), "GIF")  # not an image suffix
    cfg = DataConfig(name="folder", root=str(root), image_size=16)
    assert image_shape(cfg) == (3, 16)
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert train.images.shape == (23, 3, 16, 16) and test.images.shape == (2, 3, 16, 16)
    assert train.num_classes == 1 and set(train.labels.tolist()) == {0}

    def ids(data: ImageData) -> set[int]:
        return {round(v / 10) for v in data.images[:, 0].float().mean(dim=(1, 2)).tolist()}

    train_ids, test_ids = ids(train), ids(test)
    assert not train_ids & test_ids and train_ids | test_ids == set(range(25))

    # A fresh process with an empty decoded cache holds out the same images.
    load_split.cache_clear()
    monkeypatch.setenv("FEDAPP_DATA_DIR", str(tmp_path / "other-cache"))
    assert ids(load_split(cfg, "test")) == test_ids
    assert (tmp_path / "other-cache" / "decoded").is_dir()


def test_folder_two_images_gives_one_test(tmp_path: Path) -> None:
    for i in range(2):
        write_image(tmp_path / f"{i}.bmp", (10, 10), (i, i, i), "BMP")
    cfg = DataConfig(name="folder", root=str(tmp_path))
    assert len(load_split(cfg, "train")) == 1 and len(load_split(cfg, "test")) == 1


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="data.root"):
        load_split(DataConfig(name="folder"), "train")
    with pytest.raises(DatasetNotFoundError, match="no images"):
        load_split(DataConfig(name="folder", root=str(tmp_path)), "train")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError) as info:
        load_split(DataConfig(name="folder", root=str(tmp_path)), "train")
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- misc


def test_image_shape_without_loading() -> None:
    assert image_shape(DataConfig()) == (1, 28)
    assert image_shape(DataConfig(name="cifar10")) == (3, 32)
    assert image_shape(DataConfig(name="celeba")) == (3, 64)
    assert image_shape(DataConfig(name="folder")) == (3, 64)
    assert image_shape(DataConfig(name="cifar10", image_size=48)) == (3, 48)


def test_subset_and_validation() -> None:
    data = ImageData(torch.arange(5, dtype=torch.uint8).reshape(5, 1, 1, 1).repeat(1, 1, 2, 2),
                     torch.arange(5), 5)
    for idx in ([3, 1], np.array([3, 1]), torch.tensor([3, 1])):
        sub = data.subset(idx)
        assert sub.labels.tolist() == [3, 1] and sub.num_classes == 5
        assert sub.images[:, 0, 0, 0].tolist() == [3, 1] and sub.images.is_contiguous()
    assert len(data.subset([])) == 0
    with pytest.raises(ValueError):
        ImageData(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.int64), 1)
    with pytest.raises(ValueError):
        load_split(DataConfig(), "valid")  # type: ignore[arg-type]


def test_model_range_round_trip() -> None:
    u8 = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = to_model_range(u8)
    assert x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert torch.equal(to_uint8(x), u8)
    assert to_uint8(torch.tensor([-3.0, 0.0, 5.0])).tolist() == [0, 128, 255]
    with pytest.raises(TypeError):
        to_model_range(x)


def test_the_standin_set_reads_as_fashion_mnist(tmp_path: Path) -> None:
    """What the tests run on when the real set is missing (tests/conftest.py)."""
    from tests.support.standin import SIZES, write_standin

    write_standin(tmp_path)
    for split, name in (("train", "train"), ("test", "t10k")):
        data = load_split(DataConfig(root=str(tmp_path), download=False), split)
        assert data.images.shape == (SIZES[name], 1, 28, 28) and data.num_classes == 10
        assert torch.bincount(data.labels, minlength=10).tolist() == [SIZES[name] // 10] * 10
        boxes = [int((data.images[data.labels == k][0] > 100).sum()) for k in range(10)]
        assert len(set(boxes)) == 10  # each class its own box
