"""Coordinate-wise robust aggregation: one poisoned client cannot drag the average anywhere.

The median and the trimmed mean ignore ``num-examples`` weights on purpose: a weight is
the client's own claim, and a robust rule must not let one claim dominate. The unweighted
mean is the client-level DP average (``strategies.privacy``), for the same reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from flwr.app import ArrayRecord

from fedapp.protocol.records import decode_array, encode_tensor

Aggregation = Literal["mean", "median", "trimmed-mean", "unweighted-mean"]


def robust_combine(stack: torch.Tensor, kind: Aggregation, trim: float) -> torch.Tensor:
    """Combine ``stack`` [clients, ...] over its first axis: the median, or the mean after cutting
    ``floor(trim * clients)`` values from each end of every coordinate."""
    n = stack.shape[0]
    if kind == "unweighted-mean":
        return stack.double().mean(dim=0).float()
    ordered = stack.double().sort(dim=0).values
    if kind == "median":
        middle = ordered[(n - 1) // 2 : n // 2 + 1]  # one value for odd n, the two middle ones for even n
        return middle.mean(dim=0).float()
    if kind == "trimmed-mean":
        cut = int(trim * n)
        return ordered[cut : n - cut].mean(dim=0).float()
    raise ValueError(f"unknown robust aggregation {kind!r}; use 'median', 'trimmed-mean' or 'unweighted-mean'")


def robust_record(records: Sequence[ArrayRecord], kind: Aggregation, trim: float) -> ArrayRecord:
    """The coordinate-wise combination of records that hold the same keys and shapes."""
    keys = list(records[0].keys())
    return ArrayRecord({
        key: encode_tensor(robust_combine(torch.stack([decode_array(r[key]) for r in records]), kind, trim))
        for key in keys
    })
