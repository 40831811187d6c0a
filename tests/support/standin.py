"""A small stand-in for Fashion-MNIST, written when the real one is missing, so the e2e paths still run.

Same files, format and sizes per image as the real set (IDX, gzip, 28x28 uint8, ten classes),
fewer images: class k is a bright box of its own width and height over noise. Good enough
for every test that needs *some* data; the tests that need the real images (the committed
classifier, the Fréchet anchors) are marked ``needs_real_fmnist`` and skip, and the test
command names them in one loud line at the end.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from fedapp.config import DataConfig
from fedapp.data.sources import fashion_mnist_candidates

SIZES = {"train": 6000, "t10k": 1000}


def have_fashion_mnist() -> bool:
    """Whether fedapp finds IDX files where it looks by default (cache, then the Debian copy)."""
    return any((folder / "train-images-idx3-ubyte.gz").is_file() or (folder / "train-images-idx3-ubyte").is_file()
               for folder in fashion_mnist_candidates(DataConfig(download=False)))


def _idx(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()


def write_standin(folder: Path, seed: int = 0) -> Path:
    """``train``/``t10k`` images and labels as gzipped IDX files in ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in SIZES.items():
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        images = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
        for k in range(10):
            half_h, half_w = 2 + k, 12 - k // 2
            images[labels == k, 14 - half_h:14 + half_h, 14 - half_w:14 + half_w] += np.uint8(150 + 8 * k)
        for kind, array, magic in (("images-idx3", images, 2051), ("labels-idx1", labels, 2049)):
            (folder / f"{split}-{kind}-ubyte.gz").write_bytes(gzip.compress(_idx(array, magic), compresslevel=1))
    return folder
