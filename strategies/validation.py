"""Checks a client's reply must pass before it is averaged.

Flower checks none of this: a broadcastable wrong shape is averaged silently, one NaN
poisons the model, and ``num-examples`` is whatever the client claims.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedapp.protocol.keys import PARTITION_ID
from fedapp.protocol.records import ArrayProblem, decode_checked, encode_tensor


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


def is_count(value: object) -> bool:
    """A finite positive whole number, as an int or an integral float; never a bool, string or list."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value > 0
    return isinstance(value, float) and math.isfinite(value) and value.is_integer() and value > 0


def weight_problem(content: RecordDict, weighted_by_key: str, max_examples: int) -> str | None:
    """A reply's weight is the client's own claim: one MetricRecord, a whole number in [1, max_examples]."""
    metrics = list(content.metric_records.values())
    weight = metrics[0].get(weighted_by_key) if len(metrics) == 1 else None
    if not is_count(weight) or weight > max_examples:  # type: ignore[operator]
        return (f"expected one MetricRecord with an integer {weighted_by_key!r} in [1, {max_examples}] "
                f"(strategy.max-num-examples), got {weight!r}"[:300])
    return None


def check_reply(content: RecordDict, expected: Mapping[str, tuple[int, ...]], *, arrays_key: str,
                weighted_by_key: str, max_examples: int) -> tuple[str | None, dict[str, torch.Tensor]]:
    """(why a reply cannot be averaged into a model of ``expected`` keys and shapes, or None; its
    arrays decoded to float32). Every array is decoded and checked on its bytes, not its metadata."""
    if arrays_key not in content.array_records or len(content.array_records) != 1:
        return f"expected one ArrayRecord named {arrays_key!r}", {}
    problem = weight_problem(content, weighted_by_key, max_examples)
    if problem:
        return problem, {}
    arrays = content[arrays_key]
    got = set(arrays.keys())
    if got != set(expected):
        return (f"it reported {len(got)} keys, expected {len(expected)} "
                f"(unexpected {sorted(got - set(expected))[:2]}, missing {sorted(set(expected) - got)[:2]})"), {}
    tensors: dict[str, torch.Tensor] = {}
    for key in sorted(got):
        try:
            tensors[key] = decode_checked(arrays[key], tuple(expected[key]))
        except ArrayProblem as err:
            return f"array {key!r}: {err}", {}
    return None, tensors


def reply_problem(content: RecordDict, expected: Mapping[str, tuple[int, ...]], *, arrays_key: str,
                  weighted_by_key: str, max_examples: int) -> str | None:
    """Why a reply cannot be averaged into a model of ``expected`` keys and shapes, or None."""
    return check_reply(content, expected, arrays_key=arrays_key, weighted_by_key=weighted_by_key,
                       max_examples=max_examples)[0]


def _scalar(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def canonical_metrics(contents: list[RecordDict], common: bool = True) -> None:
    """Keep in each reply's one MetricRecord only its finite scalar metrics, and with ``common`` only
    those every reply has.

    Flower's weighted mean ends aggregation (and the run) on replies whose metric keys differ, so
    there a client's extra, missing, list or NaN metric costs that metric, not the round. The
    per-client mean and std (personal models) takes each metric over the clients that have it.
    """
    records = [next(iter(c.metric_records.values())) for c in contents]
    kept = [{k for k, v in r.items() if _scalar(v)} for r in records]
    shared = set.intersection(*kept) if kept else set()
    for content, record, keys in zip(contents, records, kept):
        name = next(iter(content.metric_records))
        content[name] = MetricRecord({k: record[k] for k in sorted(shared if common else keys)})  # type: ignore[misc]


def canonical_reply(content: RecordDict, arrays_key: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Replace what a validated reply holds by what was checked: its float32 tensors and its one
    MetricRecord, and no other record; what Flower then averages is exactly what passed."""
    name = next(iter(content.metric_records))
    metrics = content.metric_records[name]
    for key in list(content.keys()):
        del content[key]
    content[arrays_key] = ArrayRecord({k: encode_tensor(v) for k, v in tensors.items()})
    content[name] = metrics
