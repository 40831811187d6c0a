"""Conversion between models and Flower records, the transport dtype, and what a record weighs.

Arrays may travel in a narrower type than the model trains in (``transport.dtype``): a
narrower float, or 8- or 4-bit codes with their scales (``fedapp.protocol.quantize``).
Whoever receives them widens them to float32 before training or averaging, so precision is
lost once per hop and never accumulates. numpy has no bfloat16, so bfloat16 arrays travel
as their raw bytes under a stype of our own; only :func:`decode_record` reads them.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping
from typing import get_args

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from torch import nn

from fedapp.config import TransportDtype
from fedapp.files import one_line
from fedapp.protocol.keys import UPLOAD_KEYS
from fedapp.protocol.quantize import BITS, STYPES, Quantizer, QuantProblem, decode_quantized, quantize
from fedapp.train.collafuse import Upload

TRANSPORT_DTYPES: tuple[str, ...] = get_args(TransportDtype)
FLOAT_TRANSPORTS: tuple[str, ...] = tuple(d for d in TRANSPORT_DTYPES if d not in BITS)  # CollaFuse: these only
RAW_BF16 = "fedapp.raw-bfloat16"  # Array.stype of a bfloat16 array sent as its bytes


def encode_tensor(tensor: torch.Tensor, dtype: TransportDtype = "float32", quantizer: Quantizer | None = None) -> Array:
    """One tensor as a Flower Array; floating tensors are cast to ``dtype`` (quantized by ``quantizer``
    for ``int8`` / ``int4``, which then must be given)."""
    tensor = tensor.detach().cpu()
    if not tensor.is_floating_point():
        return Array(tensor.contiguous())
    if dtype in BITS:
        if quantizer is None or quantizer.dtype != dtype:
            raise ValueError(f"transport dtype {dtype} needs a Quantizer of that dtype")
        return quantize(tensor, quantizer)
    if dtype == "bfloat16":
        raw = tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
        return Array("bfloat16", tuple(tensor.shape), RAW_BF16, raw)
    return Array(tensor.to(getattr(torch, dtype)).contiguous())


def decode_array(array: Array) -> torch.Tensor:
    """The array as a tensor, floating values widened to float32 (the training and averaging type)."""
    return decode_checked(array, floats=False)


FLOAT_DTYPES = ("float32", "float16", "bfloat16")  # what a model array may arrive as
NUMPY_STYPE = "numpy.ndarray"  # Flower's stype for np.save'd bytes


class ArrayProblem(ValueError):
    """A received array that cannot be used; its message is one line naming what is wrong."""


def decode_checked(array: object, shape: tuple[int, ...] | None = None, *, floats: bool = True) -> torch.Tensor:
    """Decode a received array and check that its bytes hold what its metadata and the receiver say.

    The metadata (dtype, shape) is the sender's claim and so are the bytes: both are checked, the
    decoded tensor's shape, dtype and element count against the metadata and against ``shape``.
    Floats come back widened to float32 and must be finite. Anything else raises ArrayProblem.
    """
    try:
        stype, dtype, data = str(array.stype), str(array.dtype), bytes(array.data)  # type: ignore[attr-defined]
        claimed = tuple(int(d) for d in array.shape)  # type: ignore[attr-defined]
    except Exception as err:  # noqa: BLE001 - whatever a client sent, the answer is one line
        raise ArrayProblem(f"not a readable array ({one_line(err, with_type=True)})") from None
    if shape is not None and claimed != tuple(shape):
        raise ArrayProblem(f"shape {claimed}, expected {tuple(shape)}")
    quantized = stype in STYPES or (floats and dtype in BITS)
    if floats and dtype not in FLOAT_DTYPES and not quantized:
        raise ArrayProblem(f"dtype {dtype}, expected one of {', '.join(FLOAT_DTYPES)}")
    if any(d < 0 for d in claimed):
        raise ArrayProblem(f"negative dimension in shape {claimed}")
    if quantized:
        try:
            return decode_quantized(dtype, claimed, stype, data)
        except QuantProblem as err:
            raise ArrayProblem(str(err)) from None
    if stype == RAW_BF16:
        count = math.prod(claimed)
        if dtype != "bfloat16" or len(data) != 2 * count:
            raise ArrayProblem(f"{len(data)} bytes of {dtype} for shape {claimed}, expected {2 * count} of bfloat16")
        tensor = torch.from_numpy(np.frombuffer(data, dtype=np.int16).reshape(claimed).copy()).view(torch.bfloat16)
    elif stype == NUMPY_STYPE:
        try:
            held = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as err:  # noqa: BLE001
            raise ArrayProblem(f"bytes are not a numpy array ({one_line(err, with_type=True)})") from None
        if not isinstance(held, np.ndarray):
            raise ArrayProblem(f"bytes hold a {type(held).__name__}, not one array")
        if tuple(held.shape) != claimed or str(held.dtype) != dtype:
            raise ArrayProblem(f"bytes hold {held.dtype} {tuple(held.shape)} but the metadata says {dtype} {claimed}")
        try:
            tensor = torch.from_numpy(np.ascontiguousarray(held))
        except TypeError as err:
            raise ArrayProblem(f"dtype {held.dtype} has no tensor type ({one_line(err)})") from None
    else:
        raise ArrayProblem(f"unknown stype {stype[:40]!r}")
    if tensor.is_floating_point():
        tensor = tensor.float()
        if floats and not bool(torch.isfinite(tensor).all()):
            raise ArrayProblem("holds NaN or Inf")
    elif floats:
        raise ArrayProblem(f"bytes hold {tensor.dtype}, expected a float")
    return tensor


def encode_state(state: Mapping[str, torch.Tensor], dtype: TransportDtype = "float32",
                 quantizer: Quantizer | None = None) -> ArrayRecord:
    return ArrayRecord({k: encode_tensor(v, dtype, quantizer) for k, v in state.items()})


def decode_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: decode_array(v) for k, v in record.items()}


def recast_record(record: ArrayRecord, dtype: TransportDtype, quantizer: Quantizer | None = None) -> ArrayRecord:
    """The record in another transport dtype (float32 decodes a narrow record for averaging)."""
    return encode_state(decode_record(record), dtype, quantizer)


def record_dtypes(record: ArrayRecord) -> set[str]:
    return {a.dtype for a in record.values()}


def model_to_record(model: nn.Module, keys: Iterable[str] | None = None,
                    dtype: TransportDtype = "float32", quantizer: Quantizer | None = None) -> ArrayRecord:
    """The model's state (or only ``keys`` of it) as an ArrayRecord with the torch names."""
    state = model.state_dict()
    if keys is not None:
        state = {k: state[k] for k in keys}
    return encode_state(state, dtype, quantizer)


def load_record(model: nn.Module, record: ArrayRecord, strict: bool = True) -> None:
    """Copy a record's arrays into the model; with ``strict``, keys must match exactly."""
    state = decode_record(record)
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


def wire_bytes(content: RecordDict) -> int:
    """Bytes of the content as Flower transmits it: every distinct object it deflates into.

    That is the array payloads plus Flower's object heads and the config and metric records;
    identical array chunks are sent once, as Flower does.
    """
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


def state_numel(state: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in state.values())


def upload_to_record(upload: Upload, dtype: TransportDtype = "float32") -> ArrayRecord:
    """CollaFuse's server-bound triples: x_t, t and the target, never the images behind them."""
    x_t, t, target = UPLOAD_KEYS
    return ArrayRecord({x_t: encode_tensor(upload.x_t, dtype), t: encode_tensor(upload.t),
                        target: encode_tensor(upload.target, dtype)})
