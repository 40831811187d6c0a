"""Fréchet distances between generated and real images, in named feature spaces.

Two spaces: ``fd-cnn`` (fedapp's own Fashion-MNIST classifier, offline, the CPU default)
and ``fid`` (pytorch-fid's InceptionV3, the papers' metric, where its weights can be had).
They are never mixed up: every output carries the space's name. The real statistics are
computed once per data set, split, image size and feature network, and cached as ``.npz``.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from types import ModuleType
from unittest import mock

import numpy as np
import torch
from pytorch_fid import fid_score
from pytorch_fid.fid_score import calculate_frechet_distance
from scipy import linalg
from torch import nn
from tqdm.auto import tqdm

from fedapp.config import DataConfig, EvalConfig
from fedapp.data.pixels import image_shape, to_model_range
from fedapp.data.sources import data_cache_dir, load_split
from fedapp.eval.classifier import find_classifier, load_classifier
from fedapp.eval.inception import FIDWeightsUnavailable, InceptionFeatures, find_fid_weights
from fedapp.files import atomic_write
from fedapp.log import log

FD_CNN = "fd-cnn"
FID = "fid"
METRIC_NAMES = (FD_CNN, FID)
# Improved precision and recall (fedapp.eval.precision_recall), in the classifier's feature space
PRECISION, RECALL = f"{FD_CNN}-precision", f"{FD_CNN}-recall"
# How far the classifier's class shares of the samples are from the reference split's (fedapp.eval.classes)
CLASS_TVD = f"{FD_CNN}-class-tvd"
QUALITY_NAMES = (*METRIC_NAMES, PRECISION, RECALL, CLASS_TVD)


@dataclass(frozen=True)
class Stats:
    mu: np.ndarray
    sigma: np.ndarray
    n: int


class ClassifierFeatures(nn.Module):
    """The classifier's 128-d penultimate activations; only defined for Fashion-MNIST at 28 px."""

    name = FD_CNN

    def __init__(self, path: Path | None = None) -> None:
        super().__init__()
        path = path or find_classifier()
        self.net, meta = load_classifier(path)
        self.dim = int(meta["feature_dim"])
        self.ident = "cnn-" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


@torch.no_grad()
def feature_stats(space: nn.Module, images: torch.Tensor, *, batch_size: int = 256,
                  device: torch.device | str = "cpu", progress: bool = False, desc: str = "features") -> Stats:
    """Mean and covariance of ``space``'s features over uint8 or [-1, 1] float images."""
    if len(images) < 2:  # before any feature is computed
        raise ValueError(f"a covariance needs at least 2 images, got {len(images)}")
    return stats_of(features(space, images, batch_size=batch_size, device=device, progress=progress, desc=desc))


def stats_of(f: np.ndarray) -> Stats:
    """Mean and covariance of features (N, D)."""
    if len(f) < 2:
        raise ValueError(f"a covariance needs at least 2 images, got {len(f)}")
    return Stats(mu=f.mean(axis=0), sigma=np.cov(f, rowvar=False), n=len(f))


@torch.no_grad()
def features(space: nn.Module, images: torch.Tensor, *, batch_size: int = 256,
             device: torch.device | str = "cpu", progress: bool = False, desc: str = "features") -> np.ndarray:
    """``space``'s features (N, D) in float64 of uint8 or [-1, 1] float images; finite or a ValueError."""
    space = space.to(device).eval()
    feats = []
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for first in range(0, len(images), batch_size):
            batch = images[first:first + batch_size]
            x = to_model_range(batch) if batch.dtype == torch.uint8 else batch.to(torch.float32)
            feats.append(space(x.to(device)).to("cpu", torch.float64))
            bar.update(len(batch))
    space.to("cpu")
    f = torch.cat(feats).numpy()
    if not np.isfinite(f).all():
        raise ValueError(f"{space.name} features are not finite; the images hold NaN or Inf")
    return f


class _SqrtmWithDisp(ModuleType):
    """scipy.linalg, with the ``sqrtm(..., disp=False)`` form that pytorch-fid 0.3 calls.

    scipy deprecated ``disp`` and newer scipy dropped it; pytorch-fid only reads the root, never
    the error estimate, so the root alone is what it gets, and no deprecation warning per score.
    """

    def __getattr__(self, name: str) -> object:
        return getattr(linalg, name)

    @staticmethod
    def sqrtm(a: np.ndarray, disp: bool = True) -> tuple[np.ndarray, float]:
        return linalg.sqrtm(a), 0.0


def frechet_distance(a: Stats, b: Stats) -> float:
    """pytorch-fid's distance. Its "Matrix is singular" warning is silenced: a covariance of a few
    hundred samples is often near-singular, and pytorch-fid already adds its offset where the root
    is not finite; the warning said nothing a reader could act on, every evaluation round."""
    with mock.patch.object(fid_score, "linalg", _SqrtmWithDisp("scipy.linalg")), warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return float(calculate_frechet_distance(a.mu, a.sigma, b.mu, b.sigma))


def stats_dir(ev: EvalConfig) -> Path:
    return Path(ev.stats_dir).expanduser() if ev.stats_dir else data_cache_dir() / "frechet-stats"


def _stats_file(space: nn.Module, data: DataConfig, split: str, directory: Path, limit: int) -> Path:
    _, side = image_shape(data)
    source = f"-{hashlib.sha256(data.root.encode()).hexdigest()[:8]}" if data.name == "folder" else ""
    count = f"-n{limit}" if limit else ""
    return directory / f"{data.name}{source}-{split}{count}-{side}px-{space.name}-{space.ident}.npz"


def _read_stats(path: Path, dim: int) -> Stats | None:
    try:
        with np.load(path) as z:
            stats = Stats(mu=z["mu"], sigma=z["sigma"], n=int(z["n"]))
    except (OSError, KeyError, ValueError) as err:
        log(WARNING, "ignoring unreadable statistics cache %s (%s); recomputing", path, type(err).__name__)
        return None
    if stats.mu.shape != (dim,) or stats.sigma.shape != (dim, dim):
        log(WARNING, "ignoring statistics cache %s with shape %s; recomputing", path, stats.mu.shape)
        return None
    return stats


def _write_stats(path: Path, stats: Stats) -> None:
    atomic_write(path, lambda out: np.savez(out, mu=stats.mu, sigma=stats.sigma, n=stats.n))


def reference_split(data: DataConfig, split: str, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The real images (uint8) and labels that the reference statistics are taken over: the whole
    split, or a subset of ``limit`` of them seeded by 0 (the same subset in every process)."""
    real = load_split(data, split)
    if limit and limit < len(real.images):
        keep = torch.randperm(len(real.images), generator=torch.Generator().manual_seed(0))[:limit]
        return real.images[keep], real.labels[keep]
    return real.images, real.labels


def reference_stats(space: nn.Module, data: DataConfig, split: str, directory: Path, *, limit: int = 0,
                    batch_size: int = 256, device: torch.device | str = "cpu",
                    progress: bool = False) -> Stats:
    """The real split's statistics (of a seeded ``limit`` subset if > 0), cached."""
    path = _stats_file(space, data, split, directory, limit)
    if path.is_file() and (cached := _read_stats(path, space.dim)) is not None:
        return cached
    real, _ = reference_split(data, split, limit)
    stats = feature_stats(space, real, batch_size=batch_size, device=device, progress=progress,
                          desc=f"{space.name} real {split}")
    _write_stats(path, stats)
    return stats


def feature_spaces(ev: EvalConfig, data: DataConfig) -> list[nn.Module]:
    """The configured spaces that can run here; a space that cannot says why in one line.

    ``eval.fid = "required"`` turns a missing Inception into an error instead of a skip.
    """
    spaces: list[nn.Module] = []
    if ev.fd_cnn:
        if data.name == "fashion-mnist" and image_shape(data) == (1, 28):
            try:
                spaces.append(ClassifierFeatures(find_classifier(ev.fd_cnn_weights)))
            except FileNotFoundError as err:
                log(WARNING, "%s skipped: %s", FD_CNN, err)
        else:
            log(WARNING, "%s skipped: its classifier is defined for fashion-mnist at 28 px, not %s at %d px",
                FD_CNN, data.name, image_shape(data)[1])
    if ev.fid != "off":
        try:
            spaces.append(InceptionFeatures(find_fid_weights(ev.fid_weights)))
        except FIDWeightsUnavailable as err:
            if ev.fid == "required":
                raise
            log(WARNING, "FID skipped (eval.fid = auto): %s", err)
    return spaces
