"""Sample quality of one model: N generated images scored in every available feature space.

Used the same way by the server (global model), by each client (its own model) and by the
centralized baseline, so every number in a comparison comes from the same code.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
from torch import nn

from fedapp.config import FedConfig
from fedapp.data.pixels import image_shape
from fedapp.data.sources import DatasetNotFoundError, load_split
from fedapp.eval.classes import counts_of_features, total_variation
from fedapp.eval.classifier import NUM_CLASSES
from fedapp.eval.frechet import (
    CLASS_TVD,
    FD_CNN,
    PRECISION,
    RECALL,
    Stats,
    feature_spaces,
    features,
    frechet_distance,
    reference_split,
    reference_stats,
    stats_dir,
    stats_of,
)
from fedapp.eval.precision_recall import precision_recall
from fedapp.model.diffusion import Diffusion
from fedapp.model.sampling import generate


class QualityMeter:
    """Fréchet metrics of generated images against the cached real statistics."""

    def __init__(self, cfg: FedConfig, device: torch.device | str = "cpu") -> None:
        self.cfg, self.device = cfg, torch.device(device)

    @cached_property
    def spaces(self) -> list[nn.Module]:
        """Built on first use, so runs that never measure never load Inception."""
        return feature_spaces(self.cfg.eval, self.cfg.data) if self.cfg.eval.metric_samples else []

    @cached_property
    def references(self) -> dict[str, Stats]:
        ev = self.cfg.eval
        return {
            space.name: reference_stats(space, self.cfg.data, ev.reference_split, stats_dir(ev),
                                        limit=ev.max_reference_examples, batch_size=ev.batch_size, device=self.device,
                                        progress=self.cfg.output.progress)
            for space in self.spaces
        }

    @cached_property
    def reference_classes(self) -> np.ndarray:
        """Label counts of the real images FD-CNN's reference statistics are taken over."""
        ev = self.cfg.eval
        _, labels = reference_split(self.cfg.data, ev.reference_split, ev.max_reference_examples)
        return np.bincount(labels.numpy(), minlength=NUM_CLASSES)

    @property
    def enabled(self) -> bool:
        return bool(self.spaces)

    @cached_property
    def real_features(self) -> torch.Tensor:
        """FD-CNN features of eval.metric-samples seeded real images of the reference split (for precision/recall)."""
        ev = self.cfg.eval
        real = load_split(self.cfg.data, ev.reference_split).images
        real = real[torch.randperm(len(real), generator=torch.Generator().manual_seed(self.cfg.seed))[:ev.metric_samples]]
        space = next(s for s in self.spaces if s.name == FD_CNN)
        return torch.from_numpy(features(space, real, batch_size=ev.batch_size, device=self.device))

    def score(self, images: torch.Tensor) -> dict[str, float]:
        """One distance per space for images in [-1, 1] (or uint8); in FD-CNN's space also precision and
        recall, and the class mix's total variation distance to the reference split's."""
        out: dict[str, float] = {}
        for space in self.spaces:
            f = features(space, images, batch_size=self.cfg.eval.batch_size, device=self.device,
                         progress=self.cfg.output.progress, desc=f"{space.name} samples")
            out[space.name] = frechet_distance(stats_of(f), self.references[space.name])
            if space.name == FD_CNN:
                out[CLASS_TVD] = total_variation(counts_of_features(space.net, f), self.reference_classes)
                if len(f) > 3:
                    scores = precision_recall(self.real_features, torch.from_numpy(f))
                    out[PRECISION], out[RECALL] = scores["precision"], scores["recall"]
        return out

    @cached_property
    def anchors(self) -> dict[str, dict[str, float]]:
        """Where a score sits, per space: N clamped Gaussian noise images and N real training images.

        Measured once per process against the same reference statistics, with N = eval.metric-samples
        (``bench/fd_cnn_anchors.py`` spreads them over seeds). Without the real training images here
        (a deployment's server) only the noise anchor is given.
        """
        n = self.cfg.eval.metric_samples
        if not self.enabled:
            return {}
        gen = torch.Generator().manual_seed(self.cfg.seed)
        channels, side = image_shape(self.cfg.data)
        sets = {"noise": torch.randn((n, channels, side, side), generator=gen).clamp(-1, 1)}
        try:
            train = load_split(self.cfg.data, "train").images
            sets["real"] = train[torch.randperm(len(train), generator=gen)[:n]]
        except DatasetNotFoundError:
            pass
        scored = {name: self.score(images) for name, images in sets.items()}
        return {space.name: {name: scores[space.name] for name, scores in scored.items()} for space in self.spaces}

    def draw(self, model: nn.Module, diffusion: Diffusion, n: int, seed: int | None = None) -> torch.Tensor:
        """n seeded samples with the configured evaluation sampler."""
        ev = self.cfg.eval
        samples = generate(
            model, diffusion, n, image_shape(self.cfg.data),
            kind=ev.sampler, steps=ev.sampler_steps,
            seed=self.cfg.seed if seed is None else seed, device=self.device, batch_size=ev.batch_size,
            progress=self.cfg.output.progress,
        )
        model.to("cpu")
        return samples

    def measure(self, model: nn.Module, diffusion: Diffusion, seed: int | None = None,
                keep: int = 0) -> tuple[dict[str, float], torch.Tensor]:
        """The metrics of ``model`` and the first ``keep`` of its samples (for a grid)."""
        n = self.cfg.eval.metric_samples if self.enabled else 0
        samples = self.draw(model, diffusion, max(n, keep), seed)
        return (self.score(samples[:n]) if n else {}), samples[:keep]
