"""Conversion between models and Flower records, and the size of what a record carries."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, RecordDict
from torch import nn


def model_to_record(model: nn.Module, keys: Iterable[str] | None = None) -> ArrayRecord:
    """The model's state (or only ``keys`` of it) as an ArrayRecord with the torch names."""
    state = model.state_dict()
    if keys is not None:
        state = {k: state[k] for k in keys}
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items()})


def load_record(model: nn.Module, record: ArrayRecord, strict: bool = True) -> None:
    """Copy a record's arrays into the model; with ``strict``, keys must match exactly."""
    state = record.to_torch_state_dict()
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state)) if strict else []
    if unknown or missing:
        raise KeyError(f"record does not fit the model: unknown keys {unknown[:3]}, missing keys {missing[:3]}")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ValueError(f"record array {key!r} has shape {tuple(value.shape)}, model expects {tuple(own[key].shape)}")
    model.load_state_dict(state, strict=strict)


def arrays_size(record: ArrayRecord) -> tuple[int, int]:
    """(number of values, payload bytes) of an ArrayRecord, read off the serialized arrays."""
    params = nbytes = 0
    for array in record.values():
        count = 1
        for dim in array.shape:
            count *= dim
        params += count
        nbytes += len(array.data)
    return params, nbytes


def content_size(content: RecordDict) -> tuple[int, int]:
    """(values, bytes) of every ArrayRecord in a message's content."""
    params = nbytes = 0
    for record in content.array_records.values():
        p, b = arrays_size(record)
        params, nbytes = params + p, nbytes + b
    return params, nbytes


def state_numel(state: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in state.values())
