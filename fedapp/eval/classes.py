"""Which garments a model draws: the FD-CNN classifier's verdict on its samples, class by class.

A Fréchet distance says that samples and data differ, not how. Under label skew the usual way is a
class the federation under-draws: FedAvg averages clients that each see few of it, and the global
model forgets it. Precision and recall hardly see that (every drawn trouser is still a good
trouser), but the class shares do. ``fedapp sample --classes`` prints them beside the shares of the
data the model learned from: the training pool for a global model, the client's own partition for
a client's model (where a personalized model is *meant* to follow its owner's classes).
Every evaluation round logs one number of it, ``fd-cnn-class-tvd``: the distance between the
samples' class mix and the reference split's, the split FD-CNN itself compares with.

The classifier is the one FD-CNN's features come from (test accuracy 0.92), so a share is exact
only to its errors; compare two models' shares, or a model's with its data's, not one share alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn

from fedapp.eval.classifier import NUM_CLASSES, FeatureCNN
from fedapp.eval.frechet import features

__all__ = ["class_counts", "class_table", "counts_of_features", "total_variation"]


class _Features(nn.Module):
    """The classifier's penultimate features as a space, so ``frechet.features`` batches them."""

    name = "FD-CNN classifier"

    def __init__(self, net: FeatureCNN) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


@torch.no_grad()
def class_counts(net: FeatureCNN, images: torch.Tensor, *, batch_size: int = 256) -> np.ndarray:
    """How many of ``images`` (uint8, or floats in [-1, 1]; (N, 1, 28, 28)) the classifier puts in
    each class: an int64 array of length 10 that sums to N."""
    if len(images) == 0:
        return np.zeros(NUM_CLASSES, dtype=np.int64)
    return counts_of_features(net, features(_Features(net), images, batch_size=batch_size))


@torch.no_grad()
def counts_of_features(net: FeatureCNN, f: np.ndarray) -> np.ndarray:
    """The class counts of images whose FD-CNN features (``net.features``, as ``frechet.features``
    returns them) are ``f``: the classifier's head on them, so an evaluation that already has the
    features for its Fréchet distance classifies its samples without a second pass."""
    logits = net.eval().head(torch.from_numpy(f).to(torch.float32))
    return np.bincount(logits.argmax(dim=1).numpy(), minlength=NUM_CLASSES).astype(np.int64)


def total_variation(counts: np.ndarray, reference: np.ndarray) -> float:
    """Half the L1 distance between two sets of class shares, each given as counts: 0 for the same
    mix, 1 for no class in common."""
    return 0.5 * float(np.abs(_shares(counts) - _shares(reference)).sum())


def _shares(counts: np.ndarray) -> np.ndarray:
    return counts / max(int(counts.sum()), 1)


def class_table(counts: np.ndarray, names: Sequence[str], references: dict[str, np.ndarray]) -> str:
    """A plain-text table: each class's drawn count and share, then its share in each reference
    (a column per entry of ``references``, each an array of label counts), and a last line with the
    total variation distance between the drawn shares and each reference's (0: the same mix,
    1: no class in common)."""
    if len(counts) != len(names):
        raise ValueError(f"{len(counts)} class counts for {len(names)} class names")
    shares = _shares(counts)
    ref_shares = {title: _shares(ref) for title, ref in references.items()}
    width = max(len(n) for n in (*names, "class"))
    columns = {title: max(len(title), 6) for title in ref_shares}
    rows = [f"{'class':<{width}}  {'drawn':>6}  {'share':>6}" + "".join(f"  {t:>{w}}" for t, w in columns.items())]
    for i, name in enumerate(names):
        rows.append(f"{name:<{width}}  {int(counts[i]):>6}  {shares[i]:>6.1%}"
                    + "".join(f"  {ref_shares[t][i]:>{w}.1%}" for t, w in columns.items()))
    rows.append(f"{'total':<{width}}  {int(counts.sum()):>6}")
    for title, ref in references.items():
        rows.append(f"total variation distance to {title}: {total_variation(counts, ref):.3f}")
    return "\n".join(rows)
