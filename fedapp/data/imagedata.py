"""One split of an image data set held in memory as uint8, and what every loader shares.

The loaders (``fedapp.data.sources`` for the IDX and pickle formats, ``fedapp.data.decoded``
for image files) build an :class:`ImageData`; this module owns the type, the cache folder
and the final resize.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from fedapp.config import DataConfig

Split = Literal["train", "test"]

#: Environment variable that overrides the default cache dir (``~/.cache/fedapp/data``).
DATA_DIR_ENV = "FEDAPP_DATA_DIR"


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


def root_dir(cfg: DataConfig) -> Path | None:
    """``data.root``, which must exist unless a download may create it: it is never silently skipped."""
    if not cfg.root:
        return None
    root = Path(cfg.root).expanduser()
    if not cfg.download and not root.is_dir():
        raise DatasetNotFoundError(f"data.root = {cfg.root!r} does not exist or is not a folder; fix the path, "
                                   "or leave data.root empty to use the cache and system copies")
    return root


def base_dir(cfg: DataConfig) -> Path:
    """The folder torchvision-style layouts live under: ``data.root`` or the cache dir."""
    return root_dir(cfg) or data_cache_dir()


def check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def resize_uint8(images: torch.Tensor, side: int, chunk: int = 1024) -> torch.Tensor:
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


def finish(images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
            num_classes: int, side: int = 0) -> ImageData:
    """Wrap decoded arrays; ``side`` > 0 resizes (the data.image-size override)."""
    img = torch.as_tensor(images)
    lab = torch.as_tensor(labels).to(torch.int64)
    if side > 0:
        img = resize_uint8(img, side)
    return ImageData(images=img.contiguous(), labels=lab.contiguous(), num_classes=num_classes)
