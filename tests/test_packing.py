"""transport.pack: a record's arrays as one object, byte for byte, and what the two ends do with it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedapp.config import TransportConfig
from fedapp.model.unet import UNet
from fedapp.protocol.comm import CommLedger
from fedapp.protocol.delta import quantizer_for
from fedapp.protocol.keys import PACKED, PACKED_LAYOUT
from fedapp.protocol.packing import (
    PackingProblem,
    is_packed,
    pack_content,
    pack_record,
    packing_mod,
    unpack_record,
)
from fedapp.protocol.records import encode_state, model_to_record, wire_bytes
from server_app.metering import MeteredGrid
from server_app.transport import PackedGrid
from strategies import Full
from tests.support.mocks import FakeGrid, reply_from

pytestmark = pytest.mark.usefixtures("task_identity")


def _same(a: ArrayRecord, b: ArrayRecord) -> None:
    assert list(a.keys()) == list(b.keys())
    for key in a.keys():
        x, y = a[key], b[key]
        assert (x.dtype, tuple(x.shape), x.stype, x.data) == (y.dtype, tuple(y.shape), y.stype, y.data), key


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int4"])
def test_packing_round_trips_every_encoding_byte_for_byte(dtype: str) -> None:
    torch.manual_seed(0)
    state = {"w": torch.randn(4, 3, 3, 3), "b": torch.randn(4), "steps": torch.arange(5), "empty": torch.zeros(0)}
    record = encode_state(state, dtype, quantizer_for(TransportConfig(dtype=dtype), 0))  # type: ignore[arg-type]
    packed = pack_record(record)
    assert is_packed(packed) and not is_packed(record)
    assert len(packed[PACKED].data) == sum(len(a.data) for a in record.values())  # the same bytes, joined
    _same(unpack_record(packed), record)


def test_a_unet_message_deflates_into_a_handful_of_objects_instead_of_hundreds() -> None:
    record = model_to_record(UNet(8, (1, 2), 1))
    loose = len(get_all_nested_objects(RecordDict({"arrays": record})))
    packed = len(get_all_nested_objects(RecordDict({"arrays": pack_record(record)})))
    assert len(record) == 150 and loose > 150  # an Array per tensor, and chunks (identical ones sent once)
    assert packed <= 6


def _bad(layout: object, data: bytes = b"\x00" * 8) -> ArrayRecord:
    text = json.dumps(layout).encode()
    return ArrayRecord({PACKED: Array("uint8", (len(data),), "fedapp.packed", data),
                        PACKED_LAYOUT: Array("uint8", (len(text),), "fedapp.packed-layout", text)})


@pytest.mark.parametrize(("layout", "says"), [
    ([["w", "float32", [2], "numpy.ndarray", 12]], "adds up to 12 bytes, its data holds 8"),
    ([["w", "float32", [1], "numpy.ndarray", 4], ["w", "float32", [1], "numpy.ndarray", 4]], "names an array twice"),
    ([["w", "float32", [1], "numpy.ndarray", -4], ["v", "float32", [1], "numpy.ndarray", 12]], "adds up to 8 bytes"),
    ({"w": 8}, "does not parse"),
])
def test_a_packed_record_that_does_not_add_up_is_refused_in_one_line(layout: object, says: str) -> None:
    with pytest.raises(PackingProblem, match=says) as err:
        unpack_record(_bad(layout))
    assert "\n" not in str(err.value)


def test_the_client_mod_unpacks_the_message_and_packs_its_reply_only_when_the_message_came_packed() -> None:
    record = model_to_record(UNet(8, (1, 2), 1))
    seen: list[ArrayRecord] = []

    def handler(msg: Message, context: Context) -> Message:
        seen.append(msg.content["arrays"])
        return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"n": 1})}), reply_to=msg)

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    for packed in (True, False):
        content = RecordDict({"arrays": record})
        if packed:
            assert pack_content(content)
        reply = packing_mod(Message(content, dst_node_id=1, message_type="train"), context, handler)
        _same(seen[-1], record)  # the handler always sees the arrays themselves
        assert is_packed(reply.content["arrays"]) is packed
        assert reply.content["metrics"]["n"] == 1


def test_the_server_packs_each_shared_record_once_and_a_bad_packed_reply_becomes_an_error() -> None:
    initial = ArrayRecord({"w": Array(np.ones(4, dtype=np.float32)), "b": Array(np.zeros(2, dtype=np.float32))})
    received: list[ArrayRecord] = []

    def respond(msg: Message) -> Message:
        sent = msg.content["arrays"]
        received.append(sent)
        if msg.metadata.dst_node_id == 2:  # a node whose packed reply lies about its size
            return Message(RecordDict({"arrays": _bad([["w", "float32", [4], "numpy.ndarray", 16]]),
                                       "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)
        back = unpack_record(sent)
        return Message(RecordDict({"arrays": pack_record(back), "metrics": MetricRecord({"num-examples": 1})}),
                       reply_to=msg)

    ledger = CommLedger()
    grid = MeteredGrid(PackedGrid(FakeGrid([1, 2], respond), pack=True), ledger, packed=True)
    result = Full(min_train_nodes=1, min_available_nodes=2, fraction_evaluate=0.0).start(
        grid=grid, initial_arrays=initial, num_rounds=1)
    assert all(is_packed(r) for r in received) and received[0] is received[1]  # packed once, sent twice
    assert np.array_equal(result.arrays["w"].numpy(), np.ones(4, dtype=np.float32))  # node 1's update alone
    errors = grid.round_errors(1, "train")
    assert len(errors) == 1 and errors[0][0] == 2 and "adds up to 16 bytes, its data holds 8" in errors[0][1]
    assert ledger.totals(message_type="train")["down_params"] == 2 * 6  # metered as the arrays, not the pack


def test_an_unpacked_peer_still_gets_through() -> None:
    reply = reply_from(3, RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(2, dtype=np.float32))})}))
    (out,) = PackedGrid(FakeGrid([3], lambda m: m), pack=True).incoming([reply])
    assert not out.has_error() and list(out.content["arrays"].keys()) == ["w"]


def test_the_ledger_counts_the_packed_message_on_the_wire_and_the_arrays_as_params() -> None:
    record = model_to_record(UNet(8, (1, 2), 1))
    content = RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 3})})
    loose, packed = CommLedger(), CommLedger()
    a = loose.add(1, 7, "up", "train", content)
    b = packed.add(1, 7, "up", "train", content, packed=True)
    assert a.params == b.params == 88_133 and a.bytes == b.bytes
    assert b.wire == wire_bytes(RecordDict({"arrays": pack_record(record), "metrics": content["metrics"]}))
    assert b.wire < a.wire  # the per-tensor object heads no longer travel
    assert list(content["arrays"].keys()) == list(record.keys())  # the content itself stays unpacked
