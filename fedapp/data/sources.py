"""Image data sets as whole uint8 tensors, decoded once per process.

Diffusion training reads every image every epoch, so per-sample PIL transforms
(the torchvision ``Dataset`` way) would dominate the run time on small images.
Here each split is decoded straight into one contiguous ``(N, C, H, W)`` uint8
tensor; batches are then plain tensor indexing, and the float conversion
(:func:`to_model_range`) happens on the device, per batch.

Sources, in the layouts torchvision uses so existing downloads are reused:

* Fashion-MNIST: IDX files from ``data.root``, the cache dir, the Debian package
  ``dataset-fashion-mnist``, or a torchvision download.
* CIFAR-10: the python pickles in ``cifar-10-batches-py``.
* CelebA: ``celeba/img_align_celeba/*.jpg`` plus ``list_eval_partition.txt``.
* folder: any tree of images under ``data.root`` (subfolders = classes).

JPEG decoding of large sets is slow, so CelebA and folder images (``fedapp.data.decoded``) are cached
on disk, already cropped and resized, under ``<cache>/decoded/``.
"""

from __future__ import annotations

import functools
import gzip
import logging
import pickle
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np

from fedapp.config import DataConfig
from fedapp.data.decoded import load_celeba, load_folder
from fedapp.data.imagedata import (
    DatasetNotFoundError,
    ImageData,
    Split,
    base_dir,
    check_split,
    data_cache_dir,
    finish,
    root_dir,
)
from fedapp.files import one_line

__all__ = [
    "CLASS_NAMES",
    "DEBIAN_FASHION_MNIST_DIR",
    "DatasetNotFoundError",
    "ImageData",
    "data_cache_dir",
    "fashion_mnist_candidates",
    "load_split",
]

log = logging.getLogger(__name__)  # a child of fedapp's logger (fedapp.log)

#: Where the Debian package ``dataset-fashion-mnist`` installs the .gz IDX files.
#: A module constant so tests can point it elsewhere.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


#: The class of each label, for the data sets whose classes are fixed: label i is ``CLASS_NAMES[name][i]``.
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}

_IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dims
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dim

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_FILES: dict[str, tuple[str, ...]] = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}


# --------------------------------------------------------------------------- Fashion-MNIST


def fashion_mnist_candidates(cfg: DataConfig) -> list[Path]:
    """Folders that may hold the IDX files, in the order they are tried.

    An explicit ``data.root`` is the only place looked at (a wrong path is an error, not a
    silent switch to another copy); without one, an earlier download in the cache, then the
    system-wide Debian copy; this keeps runs offline whenever a copy exists.
    """
    root = root_dir(cfg)
    if root is not None:
        return [root, root / "FashionMNIST" / "raw"]
    return [data_cache_dir() / "FashionMNIST" / "raw", DEBIAN_FASHION_MNIST_DIR]


def _find_file(folder: Path, stem: str) -> Path | None:
    """Plain files first: they skip the gunzip."""
    for name in (stem, stem + ".gz"):
        path = folder / name
        if path.is_file():
            return path
    return None


def _find_idx_pair(folder: Path, split: Split) -> tuple[Path, Path] | None:
    img_stem, lab_stem = _IDX_FILES[split]
    images = _find_file(folder, img_stem)
    labels = _find_file(folder, lab_stem)
    if images is None or labels is None:
        return None
    return images, labels


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"cannot read {path}: {one_line(err)}") from err


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (optionally gzipped) into an array.

    Strict about the header and length, so a truncated download fails here, naming
    the file, rather than as a reshape error somewhere in training.
    """
    data = _read_bytes(path)
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < 4:
        raise ValueError(f"corrupt IDX file {path}: only {len(data)} bytes")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"corrupt IDX file {path}: magic number {found}, expected {magic}")
    if len(data) < header:
        raise ValueError(f"corrupt IDX file {path}: truncated header ({len(data)} bytes)")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise ValueError(
            f"corrupt IDX file {path}: {len(data)} bytes, expected {expected} for shape {dims}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _load_idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path, _IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, _IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise ValueError(
            f"IDX files disagree: {images_path} has {len(images)} images, "
            f"{labels_path} has {len(labels)} labels"
        )
    return images[:, None, :, :], labels


def _load_fashion_mnist(cfg: DataConfig, split: Split) -> ImageData:
    side = cfg.image_size  # 0 keeps the files' own size
    candidates = fashion_mnist_candidates(cfg)
    for folder in candidates:
        pair = _find_idx_pair(folder, split)
        if pair is not None:
            log.info("Fashion-MNIST %s from %s", split, folder)
            images, labels = _load_idx_pair(*pair)
            return finish(images, labels, 10, side)

    reason = "download not tried (data.download=false)"
    if cfg.download:
        target = base_dir(cfg)
        try:
            _torchvision_download("FashionMNIST", target)
        except Exception as err:  # any failure becomes part of the one-line message
            reason = f"download to {target} failed: {one_line(err)}"
        else:
            raw = target / "FashionMNIST" / "raw"
            pair = _find_idx_pair(raw, split)
            if pair is not None:
                images, labels = _load_idx_pair(*pair)
                return finish(images, labels, 10, side)
            reason = f"download to {target} left no IDX files in {raw}"
    looked = ", ".join(str(p) for p in candidates)
    raise DatasetNotFoundError(
        f"Fashion-MNIST {split} split not found; looked in: {looked}; {reason}. "
        f"Fix: 'apt-get install dataset-fashion-mnist', or set data.root to a folder "
        f"with the IDX files, or set data.download=true with network access"
    )


def _torchvision_download(kind: Literal["FashionMNIST", "CIFAR10"], target: Path) -> None:
    """torchvision knows the mirrors and checksums; we only want the raw files it leaves."""
    import torchvision.datasets as tvd  # lazy: importing torchvision is slow

    target.mkdir(parents=True, exist_ok=True)
    if kind == "FashionMNIST":
        tvd.FashionMNIST(root=str(target), train=True, download=True)
    else:
        tvd.CIFAR10(root=str(target), train=True, download=True)


# --------------------------------------------------------------------------- CIFAR-10


def _cifar_dir(cfg: DataConfig) -> Path:
    root = root_dir(cfg)
    if root is not None and (root / "data_batch_1").is_file():
        return root  # data.root points at cifar-10-batches-py itself
    return base_dir(cfg) / _CIFAR_DIR


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    # The official archive is python pickles; only load files you trust (same as torchvision).
    try:
        with path.open("rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as err:
        raise ValueError(f"corrupt CIFAR-10 batch {path}: {one_line(repr(err))}") from err
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(
            f"corrupt CIFAR-10 batch {path}: data {data.shape}, {len(labels)} labels"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar10(cfg: DataConfig, split: Split) -> ImageData:
    folder = _cifar_dir(cfg)
    names = _CIFAR_FILES[split]

    def present(where: Path) -> bool:
        return all((where / n).is_file() for n in names)

    reason = "download not tried (data.download=false)"
    if not present(folder) and cfg.download:
        target = base_dir(cfg)
        try:
            _torchvision_download("CIFAR10", target)
        except Exception as err:
            reason = f"download to {target} failed: {one_line(err)}"
        folder = target / _CIFAR_DIR
    if not present(folder):
        raise DatasetNotFoundError(
            f"CIFAR-10 {split} split not found: expected {', '.join(names)} in {folder}; "
            f"{reason}. Fix: set data.root to the folder holding {_CIFAR_DIR}, "
            f"or set data.download=true with network access"
        )
    parts = [_read_cifar_batch(folder / n) for n in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return finish(images, labels, 10, cfg.image_size)


# --------------------------------------------------------------------------- entry points

_LOADERS: dict[str, Callable[[DataConfig, Split], ImageData]] = {
    "fashion-mnist": _load_fashion_mnist,
    "cifar10": _load_cifar10,
    "celeba": load_celeba,
    "folder": load_folder,
}


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, root: str, download: bool, image_size: int, split: Split,
                 cache_dir: str, debian_dir: str) -> ImageData:
    # cache_dir / debian_dir are part of the key only: both change where data is found.
    cfg = DataConfig(name=name, root=root, download=download, image_size=image_size)
    return _LOADERS[name](cfg, split)


def load_split(cfg: DataConfig, split: Split) -> ImageData:
    """One split of ``cfg``'s data set, decoded once per process.

    Many simulated clients share a process; the lru cache (keyed only on the fields
    that change the pixels) makes them share one decoded copy instead of decoding and
    holding it once each. Clear it with ``load_split.cache_clear()``.
    """
    check_split(split)
    return _load_cached(cfg.name, cfg.root, cfg.download, cfg.image_size, split,
                        str(data_cache_dir()), str(DEBIAN_FASHION_MNIST_DIR))


load_split.cache_clear = _load_cached.cache_clear  # type: ignore[attr-defined]
