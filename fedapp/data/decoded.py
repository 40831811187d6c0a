"""Image-file data sets (CelebA, any folder of images), decoded once and cached on disk.

JPEG decoding of large sets is slow, so the decoded, cropped and resized uint8 array is
kept under ``<cache>/decoded/``, one file per (source, split, size, file count).
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fedapp.config import DataConfig
from fedapp.data.imagedata import (
    DatasetNotFoundError,
    ImageData,
    Split,
    base_dir,
    data_cache_dir,
    finish,
    root_dir,
)
from fedapp.data.pixels import image_shape
from fedapp.files import atomic_write, one_line

log = logging.getLogger(__name__)  # a child of fedapp's logger (fedapp.log)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
_CELEBA_CROP = 178  # aligned CelebA images are 178x218; the square centre holds the face
_CELEBA_PARTITION = {"train": "0", "test": "2"}

_FOLDER_TEST_EVERY = 10  # 1 image in 10 is held out as "test"
_FOLDER_SPLIT_SEED = 0


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
    root = root_dir(cfg)
    if root is not None and (root / "img_align_celeba").is_dir():
        return root  # data.root points at the celeba folder itself
    return base_dir(cfg) / "celeba"


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


def load_celeba(cfg: DataConfig, split: Split) -> ImageData:
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
    return finish(images, np.zeros(len(names), dtype=np.int64), 1, side)


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


def load_folder(cfg: DataConfig, split: Split) -> ImageData:
    root = root_dir(cfg)
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
    return finish(images, np.asarray(labels, dtype=np.int64)[index], num_classes, side)
