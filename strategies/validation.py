"""Checks a client's reply must pass before it is averaged.

Flower checks none of this: a broadcastable wrong shape is averaged silently, one NaN
poisons the model, and ``num-examples`` is whatever the client claims.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from flwr.app import Message, RecordDict

from fedapp.protocol.keys import PARTITION_ID
from fedapp.protocol.records import decode_array

FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def by_node(replies: Iterable[Message]) -> list[Message]:
    """Replies in partition order (then node order), not arrival order: float sums then depend neither on
    which client was faster nor on the node ids Flower draws anew each run, so a seeded run (and a
    resumed one) gives the same model bit for bit."""
    return sorted(replies, key=lambda m: (claimed_partition(m), m.metadata.src_node_id))


def claimed_partition(reply: Message) -> int:
    """The partition id a reply states, or -1 when it states none that reads as an integer (never raises)."""
    try:
        for record in reply.content.metric_records.values():
            value = record.get(PARTITION_ID)
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                return int(value)
    except Exception:  # noqa: BLE001 - an error reply or a malformed record only loses its place in the order
        return -1
    return -1


def weight_problem(content: RecordDict, weighted_by_key: str, max_examples: int) -> str | None:
    """A reply's weight is the client's own claim: one MetricRecord, an integer in [1, max_examples]."""
    metrics = list(content.metric_records.values())
    weight = metrics[0].get(weighted_by_key) if len(metrics) == 1 else None
    if not isinstance(weight, int | float) or weight != int(weight) or not 0 < weight <= max_examples:
        return (f"expected one MetricRecord with an integer {weighted_by_key!r} in [1, {max_examples}] "
                f"(strategy.max-num-examples), got {weight!r}")
    return None


def reply_problem(content: RecordDict, expected: Mapping[str, tuple[int, ...]], *, arrays_key: str,
                  weighted_by_key: str, max_examples: int) -> str | None:
    """Why a reply cannot be averaged into a model of ``expected`` keys and shapes, or None."""
    if arrays_key not in content.array_records or len(content.array_records) != 1:
        return f"expected one ArrayRecord named {arrays_key!r}"
    problem = weight_problem(content, weighted_by_key, max_examples)
    if problem:
        return problem
    arrays = content[arrays_key]
    got = set(arrays.keys())
    if got != set(expected):
        return (f"it reported {len(got)} keys, expected {len(expected)} "
                f"(unexpected {sorted(got - set(expected))[:2]}, missing {sorted(set(expected) - got)[:2]})")
    for key in sorted(got):
        array = arrays[key]
        if array.dtype not in FLOAT_DTYPES:
            return f"array {key!r} has dtype {array.dtype}, expected a float"
        if tuple(array.shape) != tuple(expected[key]):
            return f"array {key!r} has shape {tuple(array.shape)}, expected {tuple(expected[key])}"
        if not bool(torch.isfinite(decode_array(array)).all()):
            return f"array {key!r} holds NaN or Inf"
    return None
