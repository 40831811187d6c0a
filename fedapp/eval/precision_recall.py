"""Improved precision and recall (Kynkäänniemi et al. 2019) in a feature space.

A Fréchet distance folds fidelity and diversity into one number, so a model that draws a few
garments well (a personalized client collapsing onto its own classes) can score like one that
draws all of them badly. These two tell them apart:

* precision: the share of generated images inside the real manifold, the union of the balls
  around each real feature that reach its k-th nearest real neighbour;
* recall: the share of real images inside the generated manifold, built the same way.

k = 3, as the paper recommends. Distances are Euclidean on the features, computed in chunks so
thousands of images fit in memory.
"""

from __future__ import annotations

import torch

K_NEAREST = 3


def manifold_radii(features: torch.Tensor, k: int = K_NEAREST, chunk: int = 1024) -> torch.Tensor:
    """Each point's distance to its k-th nearest other point of the same set."""
    if len(features) <= k:
        raise ValueError(f"a k = {k} manifold needs more than {k} points, got {len(features)}")
    radii = []
    for first in range(0, len(features), chunk):
        d = torch.cdist(features[first:first + chunk], features)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # the 1st is the point itself, at 0
    return torch.cat(radii)


def inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Which points fall in at least one ball (centre, radius)."""
    hits = [(torch.cdist(points[first:first + chunk], centres) <= radii).any(dim=1)
            for first in range(0, len(points), chunk)]
    return torch.cat(hits)


def precision_recall(real: torch.Tensor, generated: torch.Tensor, k: int = K_NEAREST) -> dict[str, float]:
    """``{"precision": …, "recall": …}`` of generated against real features, both (N, D)."""
    real, generated = real.double(), generated.double()
    precision = inside(generated, real, manifold_radii(real, k)).double().mean()
    recall = inside(real, generated, manifold_radii(generated, k)).double().mean()
    return {"precision": float(precision), "recall": float(recall)}
