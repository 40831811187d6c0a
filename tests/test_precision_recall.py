"""Improved precision and recall on point sets whose answers are known by hand."""

from __future__ import annotations

import pytest
import torch

from fedapp.eval.precision_recall import inside, manifold_radii, precision_recall


def test_radii_are_the_distance_to_the_kth_nearest_other_point() -> None:
    points = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert manifold_radii(points, k=1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert manifold_radii(points, k=2).tolist() == [3.0, 2.0, 3.0, 6.0]
    with pytest.raises(ValueError, match="more than 3 points"):
        manifold_radii(points[:3], k=3)


def test_a_point_counts_once_it_is_in_any_ball() -> None:
    centres, radii = torch.tensor([[0.0], [10.0]]), torch.tensor([1.0, 2.0])
    assert inside(torch.tensor([[0.5], [1.5], [11.9], [12.1]]), centres, radii).tolist() == [True, False, True, False]


def test_the_same_set_has_both_one_and_a_far_set_has_both_zero() -> None:
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(200, 8, generator=gen)
    assert precision_recall(real, real.clone()) == {"precision": 1.0, "recall": 1.0}
    assert precision_recall(real, real + 100.0) == {"precision": 0.0, "recall": 0.0}


def test_a_collapsed_generator_is_precise_but_recalls_little() -> None:
    """Every generated image near one real image: all of them are real-looking, few real ones are covered."""
    gen = torch.Generator().manual_seed(1)
    real = torch.randn(300, 4, generator=gen)
    collapsed = real[:1] + 1e-3 * torch.randn(300, 4, generator=gen)
    scores = precision_recall(real, collapsed)
    assert scores["precision"] == 1.0 and scores["recall"] < 0.05
    wide = 3.0 * torch.randn(300, 4, generator=gen)  # covers the real set, but mostly off it
    scores = precision_recall(real, wide)
    assert scores["recall"] > 0.9 and scores["precision"] < 0.6
