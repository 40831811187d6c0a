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

JPEG decoding of large sets is slow, so CelebA and folder images are also cached
on disk, already cropped and resized, under ``<cache>/decoded/``.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import os
import pickle
import warnings
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from fedapp.config import DataConfig
from fedapp.data.pixels import image_shape
from fedapp.files import atomic_write, one_line

__all__ = [
    "DEBIAN_FASHION_MNIST_DIR",
    "DatasetNotFoundError",
    "ImageData",
    "data_cache_dir",
    "fashion_mnist_candidates",
    "load_split",
]

log = logging.getLogger(__name__)  # a child of fedapp's logger (fedapp.log)

Split = Literal["train", "test"]

#: Where the Debian package ``dataset-fashion-mnist`` installs the .gz IDX files.
#: A module constant so tests can point it elsewhere.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

#: Environment variable that overrides the default cache dir (``~/.cache/fedapp/data``).
DATA_DIR_ENV = "FEDAPP_DATA_DIR"

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})


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

_CELEBA_CROP = 178  # aligned CelebA images are 178x218; the square centre holds the face
_CELEBA_PARTITION = {"train": "0", "test": "2"}

_FOLDER_TEST_EVERY = 10  # 1 image in 10 is held out as "test"
_FOLDER_SPLIT_SEED = 0


class DatasetNotFoundError(RuntimeError):
    """The data set is not on disk and could not be fetched; the message is one line
    that says where we looked and how to fix it."""


@dataclass(frozen=True, eq=False)
class ImageData:
    """One split held in memory as uint8, so it costs 4x less than float and can be
    shared by all clients of a simulation process without copies.

    Treat the tensors as read-only: :func:`load_split` hands the same object to
    every caller in the process.
    """

    images: torch.Tensor  # uint8, (N, C, H, W), contiguous
    labels: torch.Tensor  # int64, (N,)
    num_classes: int

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(
                f"labels must be int64 (N,), got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if len(self.labels) != len(self.images):
            raise ValueError(
                f"{len(self.images)} images but {len(self.labels)} labels"
            )
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices: Sequence[int] | torch.Tensor | np.ndarray) -> ImageData:
        """A copy holding only ``indices`` (partitions, validation holdouts); the class
        count is kept so label-based code sees the same label space on every client."""
        if isinstance(indices, torch.Tensor):
            index = indices.to(device="cpu", dtype=torch.long)
        else:
            index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return ImageData(
            images=self.images[index].contiguous(),
            labels=self.labels[index].contiguous(),
            num_classes=self.num_classes,
        )


# --------------------------------------------------------------------------- helpers


def data_cache_dir() -> Path:
    """Where downloads and decoded caches go: ``$FEDAPP_DATA_DIR`` or ``~/.cache/fedapp/data``.

    Read at call time so tests (and users) can redirect it per process.
    """
    env = os.environ.get(DATA_DIR_ENV, "")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fedapp" / "data"


def _root(cfg: DataConfig) -> Path | None:
    return Path(cfg.root).expanduser() if cfg.root else None


def _base_dir(cfg: DataConfig) -> Path:
    """The folder torchvision-style layouts live under: ``data.root`` or the cache dir."""
    return _root(cfg) or data_cache_dir()


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _resize_uint8(images: torch.Tensor, side: int, chunk: int = 1024) -> torch.Tensor:
    """Resize once at load time; chunked so upscaling a big set never needs the whole
    float copy in memory."""
    if images.shape[-1] == side and images.shape[-2] == side:
        return images
    out = torch.empty((images.shape[0], images.shape[1], side, side), dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):
        part = images[start : start + chunk].float()
        part = F.interpolate(part, size=(side, side), mode="bilinear", antialias=True,
                             align_corners=False)
        out[start : start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _finish(images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
            num_classes: int, side: int = 0) -> ImageData:
    """Wrap decoded arrays; ``side`` > 0 resizes (the data.image-size override)."""
    img = torch.as_tensor(images)
    lab = torch.as_tensor(labels).to(torch.int64)
    if side > 0:
        img = _resize_uint8(img, side)
    return ImageData(images=img.contiguous(), labels=lab.contiguous(), num_classes=num_classes)


# --------------------------------------------------------------------------- Fashion-MNIST


def fashion_mnist_candidates(cfg: DataConfig) -> list[Path]:
    """Folders that may hold the IDX files, in the order they are tried.

    An explicit ``data.root`` wins, then an earlier download in the cache, then the
    system-wide Debian copy; this keeps runs offline whenever a copy exists.
    """
    candidates: list[Path] = []
    root = _root(cfg)
    if root is not None:
        candidates += [root, root / "FashionMNIST" / "raw"]
    candidates.append(data_cache_dir() / "FashionMNIST" / "raw")
    candidates.append(DEBIAN_FASHION_MNIST_DIR)
    return candidates


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
            return _finish(images, labels, 10, side)

    reason = "download not tried (data.download=false)"
    if cfg.download:
        target = _base_dir(cfg)
        try:
            _torchvision_download("FashionMNIST", target)
        except Exception as err:  # any failure becomes part of the one-line message
            reason = f"download to {target} failed: {one_line(err)}"
        else:
            raw = target / "FashionMNIST" / "raw"
            pair = _find_idx_pair(raw, split)
            if pair is not None:
                images, labels = _load_idx_pair(*pair)
                return _finish(images, labels, 10, side)
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
    root = _root(cfg)
    if root is not None and (root / "data_batch_1").is_file():
        return root  # data.root points at cifar-10-batches-py itself
    return _base_dir(cfg) / _CIFAR_DIR


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
        target = _base_dir(cfg)
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
    return _finish(images, labels, 10, cfg.image_size)


# --------------------------------------------------------------------------- decoded cache


def _decoded_cache_path(kind: str, source: Path, split: str, side: int, count: int) -> Path:
    """One file per (source, split, size, file count): a changed set gets a new file."""
    key = f"{kind}|{source.resolve()}|{split}|{side}|{count}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return data_cache_dir() / "decoded" / f"{kind}-{split}-{side}px-{digest}.npy"


def _read_decoded(path: Path, count: int, side: int) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        warnings.warn(f"ignoring unreadable decoded cache {path}: {one_line(err)}", stacklevel=3)
        return None
    if arr.dtype != np.uint8 or arr.shape != (count, 3, side, side):
        warnings.warn(f"ignoring decoded cache {path} with shape {arr.shape}", stacklevel=3)
        return None
    log.info("decoded images from cache %s", path)
    return arr


def _write_decoded(path: Path, arr: np.ndarray) -> None:
    """Atomic (tmp + rename), so parallel clients never read a half-written file; a
    read-only cache dir only costs a re-decode next time."""
    try:
        atomic_write(path, lambda fh: np.save(fh, arr, allow_pickle=False))
    except OSError as err:
        warnings.warn(f"could not write decoded cache {path}: {one_line(err)}", stacklevel=3)


def _decode_one(path: Path, side: int, crop: int | None) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        w, h = rgb.size
        square = min(w, h) if crop is None else min(crop, w, h)
        left, top = (w - square) // 2, (h - square) // 2
        rgb = rgb.crop((left, top, left + square, top + square))
        if square != side:
            rgb = rgb.resize((side, side), Image.Resampling.BICUBIC)
        return np.asarray(rgb, dtype=np.uint8)
    except Exception as err:
        raise ValueError(f"cannot read image {path}: {one_line(err)}") from err


def _decode_images(paths: Sequence[Path], side: int, crop: int | None) -> np.ndarray:
    """Decode to (N, 3, side, side); threads help because PIL releases the GIL."""
    out = np.empty((len(paths), side, side, 3), dtype=np.uint8)
    if paths:
        log.info("decoding %d images to %dx%d", len(paths), side, side)

        def work(i: int) -> None:
            out[i] = _decode_one(paths[i], side, crop)

        workers = min(32, os.cpu_count() or 1, len(paths))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(work, range(len(paths))):
                pass
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def _cached_decode(kind: str, source: Path, split: str, side: int, count: int,
                   paths: Callable[[], Sequence[Path]], crop: int | None) -> np.ndarray:
    cache = _decoded_cache_path(kind, source, split, side, count)
    arr = _read_decoded(cache, count, side)
    if arr is None:
        arr = _decode_images(paths(), side, crop)
        _write_decoded(cache, arr)
    return arr


# --------------------------------------------------------------------------- CelebA


def _celeba_dir(cfg: DataConfig) -> Path:
    root = _root(cfg)
    if root is not None and (root / "img_align_celeba").is_dir():
        return root  # data.root points at the celeba folder itself
    return _base_dir(cfg) / "celeba"


def _celeba_files(partition: Path, split: Split) -> list[str]:
    wanted = _CELEBA_PARTITION[split]
    names: list[str] = []
    with partition.open() as fh:
        for number, line in enumerate(fh, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise ValueError(f"malformed line {number} in {partition}: {line.strip()!r}")
            if fields[1] == wanted:
                names.append(fields[0])
    return names


def _load_celeba(cfg: DataConfig, split: Split) -> ImageData:
    folder = _celeba_dir(cfg)
    img_dir = folder / "img_align_celeba"
    partition = folder / "list_eval_partition.txt"
    how = (
        "torchvision's CelebA download is unreliable, so place img_align_celeba/ and "
        f"list_eval_partition.txt in {folder} yourself, or set data.root to the folder "
        "holding celeba/"
    )
    if not partition.is_file():
        raise DatasetNotFoundError(f"CelebA partition file {partition} not found; {how}")
    names = _celeba_files(partition, split)
    if not names:
        raise DatasetNotFoundError(f"CelebA: {partition} lists no {split} images; {how}")

    def paths() -> list[Path]:
        if not img_dir.is_dir():
            raise DatasetNotFoundError(f"CelebA image folder {img_dir} not found; {how}")
        return [img_dir / name for name in names]

    side = image_shape(cfg)[1]
    images = _cached_decode("celeba", img_dir, split, side, len(names), paths, _CELEBA_CROP)
    return _finish(images, np.zeros(len(names), dtype=np.int64), 1, side)


# --------------------------------------------------------------------------- folder


def _folder_listing(root: Path) -> tuple[list[Path], list[int], int]:
    """All images, sorted, with labels from the immediate subfolder (or 0 when flat)."""
    files = sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    nested = [p for p in files if p.parent != root]
    if not nested:
        return files, [0] * len(files), 1
    loose = len(files) - len(nested)
    if loose:
        warnings.warn(
            f"{root} has class subfolders; ignoring {loose} image(s) directly in it",
            stacklevel=4,
        )
    classes = sorted({p.relative_to(root).parts[0] for p in nested})
    ids = {name: i for i, name in enumerate(classes)}
    return nested, [ids[p.relative_to(root).parts[0]] for p in nested], len(classes)


def _folder_split_indices(n: int, split: Split) -> np.ndarray:
    """Deterministic (seed 0) shuffle, last 10% held out; sorted back to file order."""
    n_test = n // _FOLDER_TEST_EVERY  # integer maths: no float rounding surprises
    if n >= 2:
        n_test = max(1, n_test)
    perm = np.random.default_rng(_FOLDER_SPLIT_SEED).permutation(n)
    chosen = perm[n - n_test :] if split == "test" else perm[: n - n_test]
    return np.sort(chosen)


def _load_folder(cfg: DataConfig, split: Split) -> ImageData:
    root = _root(cfg)
    if root is None:
        raise DatasetNotFoundError(
            "data.name='folder' needs data.root set to a folder of images "
            f"({', '.join(sorted(IMAGE_SUFFIXES))}; class subfolders optional)"
        )
    if not root.is_dir():
        raise DatasetNotFoundError(f"image folder {root} (data.root) does not exist")
    files, labels, num_classes = _folder_listing(root)
    if not files:
        raise DatasetNotFoundError(
            f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root} (data.root)"
        )
    index = _folder_split_indices(len(files), split)
    chosen = [files[i] for i in index]
    side = image_shape(cfg)[1]
    images = _cached_decode("folder", root, split, side, len(chosen), lambda: chosen, None)
    return _finish(images, np.asarray(labels, dtype=np.int64)[index], num_classes, side)


# --------------------------------------------------------------------------- entry points

_LOADERS: dict[str, Callable[[DataConfig, Split], ImageData]] = {
    "fashion-mnist": _load_fashion_mnist,
    "cifar10": _load_cifar10,
    "celeba": _load_celeba,
    "folder": _load_folder,
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
    _check_split(split)
    return _load_cached(cfg.name, cfg.root, cfg.download, cfg.image_size, split,
                        str(data_cache_dir()), str(DEBIAN_FASHION_MNIST_DIR))


load_split.cache_clear = _load_cached.cache_clear  # type: ignore[attr-defined]
