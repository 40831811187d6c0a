"""A model's arrays as one Flower object instead of one per tensor (``transport.pack``).

Flower sends every Array of a message as an object of its own, and every object costs a request
on each hop (ServerApp -> SuperLink -> SuperNode -> ClientApp and back), each with its own head,
hash check and, under load, tens of milliseconds. A dim-16 UNet has 220 tensors, so a training
message made about 450 requests per hop. Packing joins an ArrayRecord's arrays, byte for byte as
they were encoded (any ``transport.dtype``), into one Array, beside a small Array that says where
each one starts: the same bytes in two objects. Unpacking gives back Arrays equal to the originals,
so everything above this layer (transport casts, deltas, metering, strategies, training) sees the
record it would have seen unpacked.

The server packs what it sends when ``transport.pack`` is on, and a ClientApp packs its reply
exactly when the message it answers came packed (``packing_mod``). Either end unpacks whatever
arrives packed, so a packed and an unpacked peer still understand each other.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from flwr.app import Array, ArrayRecord, Context, Message, RecordDict

from fedapp.protocol.keys import PACKED, PACKED_LAYOUT

PACKED_STYPE = "fedapp.packed"  # Array.stype of the joined bytes
LAYOUT_STYPE = "fedapp.packed-layout"  # ... of the JSON layout: [[key, dtype, shape, stype, nbytes], ...]


class PackingProblem(ValueError):
    """A packed record whose layout does not describe its bytes; the message is one line."""


def is_packed(record: ArrayRecord) -> bool:
    return set(record.keys()) == {PACKED, PACKED_LAYOUT}


def pack_record(record: ArrayRecord) -> ArrayRecord:
    """The record's arrays as two: their bytes joined in record order, and the layout to split them."""
    arrays = list(record.items())
    layout = [[key, a.dtype, list(a.shape), a.stype, len(a.data)] for key, a in arrays]
    data = b"".join(a.data for _, a in arrays)
    text = json.dumps(layout, separators=(",", ":")).encode()
    return ArrayRecord({PACKED: Array("uint8", (len(data),), PACKED_STYPE, data),
                        PACKED_LAYOUT: Array("uint8", (len(text),), LAYOUT_STYPE, text)})


def unpack_record(record: ArrayRecord) -> ArrayRecord:
    """The arrays that :func:`pack_record` joined, equal to the originals; PackingProblem if it does not add up."""
    data, layout_array = record[PACKED], record[PACKED_LAYOUT]
    if data.stype != PACKED_STYPE or layout_array.stype != LAYOUT_STYPE:
        raise PackingProblem(f"packed record with stypes {data.stype!r}, {layout_array.stype!r}; expected "
                             f"{PACKED_STYPE!r}, {LAYOUT_STYPE!r}")
    try:
        layout = json.loads(layout_array.data)
        entries = [(str(k), str(dt), tuple(int(s) for s in shape), str(st), int(n)) for k, dt, shape, st, n in layout]
    except (ValueError, TypeError) as err:
        raise PackingProblem(f"packed record's layout does not parse: {err}") from None
    sizes = [n for *_, n in entries]
    if any(n < 0 for n in sizes) or sum(sizes) != len(data.data):
        raise PackingProblem(f"packed record's layout adds up to {sum(sizes)} bytes, its data holds {len(data.data)}")
    if len({k for k, *_ in entries}) != len(entries):
        raise PackingProblem("packed record's layout names an array twice")
    out, start = ArrayRecord(), 0
    for key, dtype, shape, stype, n in entries:
        out[key] = Array(dtype, shape, stype, data.data[start:start + n])
        start += n
    return out


def packed_form(record: ArrayRecord) -> ArrayRecord:
    """``record`` as it travels: packed if it holds more than one array and is not packed yet, else itself."""
    return pack_record(record) if len(record) > 1 and not is_packed(record) else record


def packed_copy(content: RecordDict) -> RecordDict:
    """A new RecordDict holding ``content`` as it travels packed (``content`` itself is left alone)."""
    return RecordDict({key: packed_form(record) if isinstance(record, ArrayRecord) else record
                       for key, record in content.items()})


def pack_content(content: RecordDict) -> bool:
    """Packs, in place, each ArrayRecord of ``content`` with more than one array; whether any was."""
    packed = False
    for key, record in list(content.array_records.items()):
        content[key] = packed_form(record)
        packed = packed or content[key] is not record
    return packed


def unpack_content(content: RecordDict) -> bool:
    """Unpacks, in place, every packed ArrayRecord of ``content``; whether any was (PackingProblem if bad)."""
    packed = False
    for key, record in list(content.array_records.items()):
        if is_packed(record):
            try:
                content[key] = unpack_record(record)
            except PackingProblem as err:
                raise PackingProblem(f"record {key!r}: {err}") from None
            packed = True
    return packed


def packing_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """A ClientApp mod: the handler sees the message unpacked; its reply goes packed if the message came packed."""
    came_packed = unpack_content(msg.content)
    reply = call_next(msg, context)
    if came_packed and not reply.has_error():
        pack_content(reply.content)
    return reply
