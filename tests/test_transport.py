"""Narrow-float transport: exact round trips, float32 averaging, and what travels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from fedapp.config import TransportConfig
from fedapp.model.unet import UNet
from fedapp.protocol.comm import CommLedger
from fedapp.protocol.records import (
    FLOAT_TRANSPORTS,
    decode_record,
    encode_state,
    load_record,
    model_to_record,
    record_dtypes,
)
from server_app.metering import MeteredGrid
from server_app.transport import TransportGrid
from strategies import Full
from tests.support.inprocess import run_inprocess
from tests.support.markers import needs_fmnist
from tests.support.mocks import FakeGrid

pytestmark = pytest.mark.usefixtures("task_identity")
CAST = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.mark.parametrize("dtype", FLOAT_TRANSPORTS)
def test_round_trip_equals_one_cast_and_comes_back_float32(dtype: str) -> None:
    torch.manual_seed(0)
    state = {"w": torch.randn(3, 5) * 10, "b": torch.randn(7), "steps": torch.arange(4)}
    record = encode_state(state, dtype)  # type: ignore[arg-type]
    assert record["w"].dtype == dtype and record["steps"].dtype == "int64"
    back = decode_record(record)
    assert back["w"].dtype == torch.float32 and back["steps"].dtype == torch.int64
    for key in ("w", "b"):
        assert torch.equal(back[key], state[key].to(CAST[dtype]).float())
    assert torch.equal(back["steps"], state["steps"])
    # Encoding what was decoded changes nothing: precision is lost once per hop, not twice.
    again = decode_record(encode_state(back, dtype))  # type: ignore[arg-type]
    assert all(torch.equal(again[k], back[k]) for k in back)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_narrow_records_load_into_a_float32_model(dtype: str) -> None:
    torch.manual_seed(1)
    src, dst = UNet(8, (1, 2), 1), UNet(8, (1, 2), 1)
    load_record(dst, model_to_record(src, dtype=dtype))  # type: ignore[arg-type]
    for key, value in dst.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, src.state_dict()[key].to(CAST[dtype]).float())


def _half_client(values: dict[int, float]) -> object:
    def respond(msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        arrays = msg.content["arrays"]
        assert record_dtypes(arrays) == {"float16"}, "the server must send the transport dtype"
        reply = {k: Array(np.full(a.shape, values[node], dtype=np.float16)) for k, a in arrays.items()}
        content = RecordDict({"arrays": ArrayRecord(reply), "metrics": MetricRecord({"num-examples": 10})})
        return Message(content, reply_to=msg)
    return respond


def test_the_server_sends_float16_and_averages_in_float32() -> None:
    # 1 and 1 + 2**-10 are float16 numbers; their mean, 1 + 2**-11, is not.
    values = {1: 1.0, 2: 1.0 + 2**-10}
    assert float(np.float16(1.0 + 2**-11)) != 1.0 + 2**-11
    initial = ArrayRecord({"w": Array(np.zeros((2, 3), dtype=np.float32))})
    ledger = CommLedger()
    grid = TransportGrid(MeteredGrid(FakeGrid(values, _half_client(values)), ledger), TransportConfig(dtype="float16"))
    result = Full(min_train_nodes=2, min_available_nodes=2, fraction_evaluate=0.0).start(
        grid=grid, initial_arrays=initial, num_rounds=1)
    final = result.arrays["w"]
    assert final.dtype == "float32"
    assert np.all(final.numpy() == np.float32(1.0 + 2**-11))
    # The ledger sits below the cast, so it counts the float16 bytes that travelled.
    totals = ledger.totals(message_type=MessageType.TRAIN)
    assert totals["down_params"] == totals["up_params"] == 12
    assert totals["down_bytes"] == 2 * (128 + 6 * 2)  # npy header + 6 float16 values, per node


def test_float32_transport_leaves_messages_alone() -> None:
    seen: list[set[str]] = []

    def respond(msg: Message) -> Message:
        seen.append(record_dtypes(msg.content["arrays"]))
        content = RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 1})})
        return Message(content, reply_to=msg)

    initial = ArrayRecord({"w": Array(np.ones(4, dtype=np.float32))})
    grid = TransportGrid(MeteredGrid(FakeGrid([1, 2], respond), CommLedger()), TransportConfig())
    result = Full(min_train_nodes=2, min_available_nodes=2, fraction_evaluate=0.0).start(
        grid=grid, initial_arrays=initial, num_rounds=1)
    assert seen == [{"float32"}, {"float32"}]
    assert np.array_equal(result.arrays["w"].numpy(), np.ones(4, dtype=np.float32))


@needs_fmnist
@pytest.mark.parametrize(("method", "dtype"), [("udec", "bfloat16"), ("full", "float16")])
def test_a_whole_run_travels_narrow_and_keeps_a_float32_global_model(tmp_path: Path, method: str,
                                                                    dtype: str) -> None:
    run, _, final = run_inprocess(tmp_path, nodes=3, **{"strategy.name": method, "transport.dtype": dtype,
                                                        "train.rounds": 2})
    assert run.sent and run.replies
    assert all(seen in ({dtype}, set()) for seen in run.dtypes)  # set(): evaluate replies carry no arrays
    assert {dtype} in run.dtypes
    state = decode_record(final)
    assert record_dtypes(final) == {"float32"}
    assert all(torch.isfinite(v).all() for v in state.values())
    train = run.ledger.totals(message_type=MessageType.TRAIN)
    assert train["up_bytes"] < 0.6 * 4 * train["up_params"]  # 2 bytes a value, plus npy headers
