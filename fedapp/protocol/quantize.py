"""Affine integer quantization of model arrays (8 or 4 bits), with per-tensor or per-channel scales.

Why this layout: an update (or a weight) of one output channel of a conv or linear layer spans
a range of its own, so one (lowest value, step) pair per output channel keeps the error of a
small-range channel small at 8 bytes a channel; per-tensor scales cost 8 bytes a tensor.
Stochastic rounding makes the decoded value an unbiased estimate of the sent one, so errors of
many clients (and, with error feedback, of many rounds) average out instead of adding up.

One array travels as one Flower ``Array``: its logical dtype (``int8`` / ``int4``), the tensor's
shape, an stype of ours naming the scale layout, and the bytes ``lowest (float32 × C)``,
``step (float32 × C)`` then the codes, one per byte at 8 bits and two per byte (low nibble
first) at 4 bits. :func:`decode_quantized` checks all of it against the metadata.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from flwr.app import Array

QuantDtype = Literal["int8", "int4"]
BITS: dict[str, int] = {"int8": 8, "int4": 4}
PER_TENSOR = "fedapp.affine-tensor"  # Array.stype: one (lowest, step) for the whole tensor
PER_CHANNEL = "fedapp.affine-channel"  # one (lowest, step) per index of dimension 0
STYPES = (PER_TENSOR, PER_CHANNEL)


class QuantProblem(ValueError):
    """Quantized bytes that do not hold what their metadata says; the message is one line."""


@dataclass(frozen=True)
class Quantizer:
    """How floats become codes: the bits, the scale layout and the rounding.

    ``generator`` draws the stochastic rounding; seed it, so a run (and its resume) repeats.
    """

    dtype: QuantDtype
    per_channel: bool = True
    stochastic: bool = True
    generator: torch.Generator | None = None

    @property
    def bits(self) -> int:
        return BITS[self.dtype]


def channels(shape: tuple[int, ...], per_channel: bool) -> int:
    """How many (lowest, step) pairs a tensor of ``shape`` carries: dimension 0 for per-channel
    scales of a tensor with 2 or more dimensions, else one."""
    return shape[0] if per_channel and len(shape) >= 2 else 1


def payload_bytes(shape: tuple[int, ...], dtype: QuantDtype, per_channel: bool) -> int:
    """Bytes of one quantized array's data: 8 per scale pair plus the packed codes."""
    count = math.prod(shape)
    return 8 * channels(shape, per_channel) + math.ceil(count * BITS[dtype] / 8)


def quantize(tensor: torch.Tensor, quantizer: Quantizer) -> Array:
    """``tensor`` (any float type) as a quantized Array; decoded, each value lies within one step."""
    x = tensor.detach().to("cpu", torch.float32)
    shape = tuple(x.shape)
    c = channels(shape, quantizer.per_channel)
    rows = x.reshape(c, math.prod(shape) // max(c, 1))
    levels = 2**quantizer.bits - 1
    if rows.shape[1]:
        lowest, highest = rows.min(dim=1).values, rows.max(dim=1).values
    else:
        lowest = highest = torch.zeros(c)
    step = (highest - lowest) / levels
    step = torch.where(step > 0, step, torch.ones_like(step))  # a constant row: every code 0
    scaled = (rows - lowest[:, None]) / step[:, None]
    if quantizer.stochastic:
        if quantizer.generator is None:
            raise ValueError("stochastic rounding needs a seeded generator (Quantizer.generator)")
        scaled = torch.floor(scaled + torch.rand(scaled.shape, generator=quantizer.generator))
    else:
        scaled = torch.round(scaled)
    codes = scaled.clamp_(0, levels).to(torch.uint8).reshape(-1).numpy()
    if quantizer.bits == 4:
        if codes.size % 2:
            codes = np.append(codes, np.uint8(0))
        codes = codes[0::2] | (codes[1::2] << 4)
    data = lowest.numpy().tobytes() + step.numpy().tobytes() + codes.astype(np.uint8).tobytes()
    return Array(quantizer.dtype, shape, PER_CHANNEL if quantizer.per_channel else PER_TENSOR, data)


def decode_quantized(dtype: str, shape: tuple[int, ...], stype: str, data: bytes) -> torch.Tensor:
    """The float32 tensor a quantized array stands for; QuantProblem if its bytes do not fit."""
    if dtype not in BITS:
        raise QuantProblem(f"dtype {dtype} with stype {stype}, expected one of {', '.join(BITS)}")
    if stype not in STYPES:
        raise QuantProblem(f"unknown quantized stype {stype[:40]!r}")
    per_channel = stype == PER_CHANNEL
    expected = payload_bytes(shape, dtype, per_channel)  # type: ignore[arg-type]
    if len(data) != expected:
        raise QuantProblem(f"{len(data)} bytes for {dtype} {shape} ({stype}), expected {expected}")
    c, count, bits = channels(shape, per_channel), math.prod(shape), BITS[dtype]
    lowest = np.frombuffer(data, dtype=np.float32, count=c)
    step = np.frombuffer(data, dtype=np.float32, count=c, offset=4 * c)
    if not (np.isfinite(lowest).all() and np.isfinite(step).all()):
        raise QuantProblem("a scale is NaN or Inf")
    if (step <= 0).any():
        raise QuantProblem("a quantization step is not positive")
    packed = np.frombuffer(data, dtype=np.uint8, offset=8 * c)
    if bits == 4:
        codes = np.empty(2 * packed.size, dtype=np.uint8)
        codes[0::2], codes[1::2] = packed & 0x0F, packed >> 4
        codes = codes[:count]
    else:
        codes = packed
    values = lowest[:, None] + codes.reshape(c, count // max(c, 1)).astype(np.float32) * step[:, None]
    tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)
    if not bool(torch.isfinite(tensor).all()):
        raise QuantProblem("decodes to NaN or Inf")
    return tensor
