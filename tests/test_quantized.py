"""Quantized and delta transport: codes and their error bounds, the reference chain both ends hold,
error feedback, malformed payloads, and whole in-process runs (bytes against the analytic count)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from client_app.node import held_reference
from fedapp.config import ConfigError, TransportConfig
from fedapp.model.build import build_model
from fedapp.model.unet import unet_parts
from fedapp.protocol.comm import CommLedger
from fedapp.protocol.delta import RESYNC, ReferenceChain, add_change, client_update, state_digest
from fedapp.protocol.keys import ARRAYS, CONFIG, INIT_DIGEST, TRANSPORT, TRANSPORT_BASE, TRANSPORT_VERSION
from fedapp.protocol.methods import shared_keys
from fedapp.protocol.quantize import PER_CHANNEL, PER_TENSOR, Quantizer, payload_bytes, quantize
from fedapp.protocol.records import ArrayProblem, arrays_size, decode_checked, decode_record, encode_state
from fedapp.runs.node_state import REFERENCE, RESIDUAL, load_node_model, load_node_round
from server_app.metering import MeteredGrid
from server_app.transport import DeltaGrid
from tests.support.inprocess import InProcessRun, run_inprocess, tiny_config
from tests.support.markers import needs_fmnist
from tests.support.mocks import FakeGrid, reply_from

pytestmark = pytest.mark.usefixtures("task_identity")
LEVELS = {"int8": 255, "int4": 15}
SHAPES = [(16, 8, 3, 3), (5, 3), (7,), ()]


def _steps(x: torch.Tensor, dtype: str, per_channel: bool) -> torch.Tensor:
    """The step each value of ``x`` was quantized with, broadcast to its shape."""
    rows = x.reshape(x.shape[0], -1) if per_channel and x.dim() >= 2 else x.reshape(1, -1)
    step = (rows.max(dim=1).values - rows.min(dim=1).values) / LEVELS[dtype]
    return step[:, None].expand_as(rows).reshape(x.shape)


# ------------------------------------------------------------------------------------ codes
@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_nearest_codes_decode_within_half_a_step_at_the_analytic_size(dtype: str, per_channel: bool,
                                                                      shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    if x.dim() >= 2:  # channels of very different ranges
        x = x * torch.logspace(-3, 1, shape[0]).reshape(-1, *[1] * (x.dim() - 1))
    array = quantize(x, Quantizer(dtype, per_channel, stochastic=False))  # type: ignore[arg-type]
    assert array.dtype == dtype and tuple(array.shape) == shape
    assert array.stype == (PER_CHANNEL if per_channel else PER_TENSOR)
    assert len(array.data) == payload_bytes(shape, dtype, per_channel)  # type: ignore[arg-type]
    back = decode_checked(array, shape)
    assert back.dtype == torch.float32 and tuple(back.shape) == shape
    error = (back - x).abs()
    assert bool((error <= _steps(x, dtype, per_channel) / 2 + 1e-6).all())


def test_per_channel_scales_keep_a_small_channel_small() -> None:
    x = torch.stack([torch.linspace(-1e-3, 1e-3, 64), torch.linspace(-10, 10, 64)])
    channel = decode_checked(quantize(x, Quantizer("int4", True, stochastic=False)))
    tensor = decode_checked(quantize(x, Quantizer("int4", False, stochastic=False)))
    assert float((channel[0] - x[0]).abs().max()) <= 1e-3 / 15 + 1e-7
    assert float((tensor[0] - x[0]).abs().max()) > 0.5  # one step of the whole tensor is 20 / 15


def test_four_bit_codes_travel_two_a_byte_low_nibble_first() -> None:
    array = quantize(torch.tensor([0.0, 15.0, 1.0, 14.0, 7.0]), Quantizer("int4", stochastic=False))
    lowest, step = np.frombuffer(array.data[:8], dtype=np.float32)
    assert (lowest, step) == (0.0, 1.0)
    assert array.data[8:] == bytes([0xF0, 0xE1, 0x07])  # codes 0 15 | 1 14 | 7 and a zero pad nibble
    assert decode_checked(array).tolist() == [0.0, 15.0, 1.0, 14.0, 7.0]


def test_a_constant_tensor_decodes_exactly() -> None:
    x = torch.full((3, 4), -2.5)
    assert torch.equal(decode_checked(quantize(x, Quantizer("int8", stochastic=False))), x)


def test_stochastic_rounding_is_unbiased_and_within_one_step() -> None:
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    quantizer = Quantizer("int4", True, stochastic=True, generator=torch.Generator().manual_seed(1))
    draws = torch.stack([decode_checked(quantize(x, quantizer)) for _ in range(2000)])
    step = _steps(x, "int4", True)
    assert bool(((draws - x).abs() <= step + 1e-6).all())
    # Each draw's error has mean 0 and standard deviation at most step / 2: the mean of 2000 is
    # within 5 of its standard errors; nearest rounding's error is not (it is up to step / 2).
    bias = (draws.mean(dim=0) - x).abs()
    assert bool((bias <= 5 * step / (2 * math.sqrt(2000))).all())
    nearest = (decode_checked(quantize(x, Quantizer("int4", True, stochastic=False))) - x).abs()
    assert float(nearest.max()) > 10 * float(bias.max())
    with pytest.raises(ValueError, match="seeded generator"):
        quantize(x, Quantizer("int4", stochastic=True))


def _with_header(array: Array, lowest: float, step: float) -> Array:
    data = np.array([lowest, step], dtype=np.float32).tobytes() + array.data[8:]
    return Array(array.dtype, tuple(array.shape), array.stype, data)


@pytest.mark.parametrize(("name", "reason"), [
    ("truncated", "expected 12"), ("NaN scale", "NaN"), ("zero step", "step is not positive"),
    ("unknown layout", "unknown quantized stype"), ("int4 bytes called int8", "expected 12"),
])
def test_a_malformed_quantized_array_is_refused_with_its_reason(name: str, reason: str) -> None:
    good = quantize(torch.arange(4.0), Quantizer("int4", False, stochastic=False))  # 8 + 2 bytes
    good8 = quantize(torch.arange(4.0), Quantizer("int8", False, stochastic=False))  # 8 + 4 bytes
    bad = {
        "truncated": Array("int8", (4,), PER_TENSOR, good8.data[:-1]),
        "NaN scale": _with_header(good, float("nan"), 1.0),
        "zero step": _with_header(good, 0.0, 0.0),
        "unknown layout": Array("int4", (4,), "fedapp.affine-rows", good.data),
        "int4 bytes called int8": Array("int8", (4,), PER_TENSOR, good.data),
    }[name]
    with pytest.raises(ArrayProblem, match=reason):
        decode_checked(bad, (4,))


# ------------------------------------------------------------------------------ the chain
DELTA = TransportConfig(dtype="int4", payload="delta")


def _state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(6, 4, generator=g) * scale, "b.bias": torch.randn(6, generator=g) * scale}


def test_server_and_node_hold_the_same_reference_bit_for_bit() -> None:
    init = _state(0)
    chain = ReferenceChain.start(init, init)
    node = dict(init)  # version 0: the node's own seeded rebuild
    held, globals_ = 0, dict(init)
    chain.follow(init, DELTA, seed=5)  # round 1 sends the seeded initialization: still version 0
    assert chain.version == 0 and chain.message(0) == (ArrayRecord(), 0)
    for r in range(1, 9):
        globals_ = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(r)) for k, v in globals_.items()}
        chain.follow(globals_, DELTA, seed=5)
        record, base = chain.message(held)
        assert base == held == r - 1 and chain.version == r
        assert {a.dtype for a in record.values()} == {"int4"}
        node = {**node, **add_change(node, record)}
        held = r
        assert all(torch.equal(node[k], chain.reference[k]) for k in init), f"version {r} differs"
        # What a delta leaves out stays in the next one: the reference trails G by at most one step.
        change_range = max(float((globals_[k] - chain.reference[k]).abs().max()) for k in init)
        assert change_range < 0.05 * 4 / 15 * 2
    record, base = chain.message(held)
    assert base == chain.version and len(record) == 0  # it holds the newest: no arrays
    chain.follow(globals_, DELTA, seed=5)  # the same global model again: no new version
    assert chain.version == 8


def test_a_node_off_the_chain_gets_its_version_whole() -> None:
    init = _state(0)
    chain = ReferenceChain.start(init, init)
    for r in (0, 1, 2):
        chain.follow(_state(r), DELTA, seed=0)
    record, base = chain.message(0)  # two versions behind
    assert base == RESYNC and {a.dtype for a in record.values()} == {"float32"}
    assert all(torch.equal(v, chain.reference[k]) for k, v in decode_record(record).items())
    assert chain.message(RESYNC)[1] == RESYNC  # a node that errored: whatever it holds now


def test_a_first_global_model_other_than_the_seeded_one_becomes_version_one_exactly() -> None:
    chain = ReferenceChain.start(_state(0), _state(0))
    trained = _state(9)
    chain.follow(trained, DELTA, seed=0)
    assert chain.version == 1 and all(torch.equal(chain.reference[k], trained[k]) for k in trained)
    assert chain.message(0)[1] == RESYNC  # nothing quantized: every node gets it whole once


def test_a_restored_chain_resends_its_version_whole_and_refuses_other_arrays() -> None:
    chain = ReferenceChain.start(_state(0), _state(0))
    for r in (0, 1, 2):
        chain.follow(_state(r, 0.1) if r else _state(0), DELTA, seed=0)
    again = ReferenceChain.start(_state(0), _state(0))
    again.restore(chain.state())
    assert (again.version, again.target) == (chain.version, chain.target)
    assert again.message(1)[1] == RESYNC and again.message(2)[1] == 2
    again.follow(_state(3, 0.1), DELTA, seed=0)
    chain.follow(_state(3, 0.1), DELTA, seed=0)
    assert all(torch.equal(again.reference[k], chain.reference[k]) for k in chain.keys)  # the same next version
    other = ReferenceChain.start({"c": torch.zeros(2)}, ["c"])
    with pytest.raises(ValueError, match="other arrays"):
        other.restore(chain.state())


def test_error_feedback_carries_what_quantization_dropped_into_the_next_upload() -> None:
    reference = _state(0)
    change = _state(1, 0.01)
    trained = {k: reference[k] + change[k] for k in reference}
    keys = list(reference)
    for feedback in (False, True):
        transport = TransportConfig(dtype="int4", payload="delta", rounding="nearest", error_feedback=feedback)
        residual: dict[str, torch.Tensor] | None = None
        total = {k: torch.zeros_like(v) for k, v in reference.items()}
        for r in range(20):
            record, residual = client_update(trained, reference, residual, keys, transport, seed=r)
            sent = decode_record(record)
            total = {k: total[k] + sent[k] for k in keys}
        mean_error = max(float((total[k] / 20 - change[k]).abs().max()) for k in keys)
        if not feedback:
            assert residual == {}
            biased = mean_error  # nearest rounding makes the same error every round
            continue
        # Exactly: what 20 uploads delivered plus what is still owed is 20 changes.
        for k in keys:
            torch.testing.assert_close(total[k] + residual[k], 20 * change[k], rtol=0, atol=1e-5)
        assert mean_error < biased / 5


def test_a_residual_of_keys_not_sent_this_round_is_kept() -> None:
    reference, keys = _state(0), ["a.weight"]
    transport = TransportConfig(dtype="int8", payload="delta", error_feedback=True)
    old = {"a.weight": torch.zeros(6, 4), "b.bias": torch.ones(6)}
    _, residual = client_update(_state(1), reference, old, keys, transport, seed=0)
    assert set(residual) == {"a.weight", "b.bias"} and torch.equal(residual["b.bias"], torch.ones(6))


def test_a_node_refuses_a_seeded_initialization_the_server_does_not_have(tmp_path: Path) -> None:
    init = _state(0)
    assert held_reference(tmp_path, 0, init, list(init), state_digest(init, init))["b.bias"].equal(init["b.bias"])
    with pytest.raises(RuntimeError, match="seeded initialization differs"):
        held_reference(tmp_path, 0, init, list(init), state_digest(_state(1), init))
    with pytest.raises(RuntimeError, match="no longer holds"):
        held_reference(tmp_path, 3, init, list(init), "")


# ------------------------------------------------------------------------------ the server's end
def _delta_grid() -> tuple[DeltaGrid, ArrayRecord]:
    init = _state(0)
    grid = DeltaGrid(MeteredGrid(FakeGrid([11], lambda m: m), CommLedger()), DELTA,
                     ReferenceChain.start(init, init), seed=0, init=init)
    return grid, encode_state(init)


def _train_message(arrays: ArrayRecord) -> Message:
    return Message(RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord({"server-round": 1})}), dst_node_id=11,
                   message_type=MessageType.TRAIN)


def _upload(arrays: ArrayRecord, base: object) -> Message:
    return reply_from(11, RecordDict({ARRAYS: arrays, TRANSPORT: ConfigRecord({TRANSPORT_BASE: base}),  # type: ignore[dict-item]
                                      "metrics": MetricRecord({"num-examples": 4})}))


def test_the_first_download_is_a_digest_and_an_upload_comes_back_as_float32_weights() -> None:
    grid, init = _delta_grid()
    [msg] = grid.outgoing([_train_message(init)])
    config = msg.content[CONFIG]
    assert len(msg.content[ARRAYS]) == 0 and config["server-round"] == 1
    assert (config[TRANSPORT_VERSION], config[TRANSPORT_BASE]) == (0, 0)
    assert config[INIT_DIGEST] == grid.chain.init_digest
    change = _state(1, 0.01)
    record, _ = client_update({k: grid.chain.reference[k] + change[k] for k in change}, grid.chain.reference,
                              None, list(change), DELTA, seed=0)
    [reply] = grid.incoming([_upload(record, 0)])
    assert not reply.has_error() and TRANSPORT not in reply.content
    weights = decode_record(reply.content[ARRAYS])
    sent = decode_record(record)
    assert all(torch.equal(weights[k], grid.chain.reference[k] + sent[k]) for k in weights)


@pytest.mark.parametrize(("name", "reason"), [
    ("truncated array", "dropped: array 'a.weight': .*bytes"),
    ("NaN scale", "dropped: array 'a.weight': a scale is NaN"),
    ("unknown array", "dropped: array 'c.weight' is not one the method shares"),
    ("another version", "transport version 3"),
])
def test_a_malformed_delta_upload_becomes_an_error_reply_with_its_reason(name: str, reason: str) -> None:
    grid, init = _delta_grid()
    grid.outgoing([_train_message(init)])
    record, _ = client_update(_state(1), grid.chain.reference, None, ["a.weight", "b.bias"], DELTA, seed=0)
    a = record["a.weight"]
    base = 0
    if name == "truncated array":
        record["a.weight"] = Array(a.dtype, tuple(a.shape), a.stype, a.data[:-3])
    elif name == "NaN scale":
        record["a.weight"] = _with_header(a, float("nan"), 1.0)
    elif name == "unknown array":
        record["c.weight"] = a
    else:
        base = 3
    [reply] = grid.incoming([_upload(record, base)])
    assert reply.has_error()
    assert re.search(reason, reply.error.reason or ""), reply.error.reason
    assert grid.held[11] == 0  # it replied: it holds what it was sent


def test_config_refuses_quantized_collafuse_and_feedback_without_a_delta(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CollaFuse sends training triples"):
        tiny_config(tmp_path, **{"strategy.name": "collafuse", "transport.dtype": "int8"})
    with pytest.raises(ConfigError, match="error-feedback = true needs transport.payload"):
        tiny_config(tmp_path, **{"transport.error-feedback": True})


def test_arrays_outside_the_chain_travel_whole_unless_they_are_the_seeded_ones() -> None:
    init = _state(0)
    shared, private = list(init)[:2], list(init)[2:]
    grid = DeltaGrid(MeteredGrid(FakeGrid([11], lambda m: m), CommLedger()), DELTA,
                     ReferenceChain.start(init, shared), seed=0, init=init)
    [msg] = grid.outgoing([_train_message(encode_state(init))])
    assert len(msg.content[ARRAYS]) == 0  # all of it the seeded initialization, which the node rebuilds
    trained = {**init, **{k: v + 1.0 for k, v in _state(2).items() if k in private}}
    [msg] = grid.outgoing([_train_message(encode_state(trained))])
    sent = decode_record(msg.content[ARRAYS])
    assert set(sent) == set(private) and all(torch.equal(sent[k], trained[k]) for k in private)
    with pytest.raises(ValueError, match="arrays the model does not have"):
        grid.outgoing([_train_message(encode_state({**init, "extra": torch.zeros(2)}))])


# ------------------------------------------------------------------------------ whole runs
class _FlakyRun(InProcessRun):
    """One node's round-2 train message fails (as a crashed ClientApp would)."""

    def respond(self, msg: Message) -> Message:
        if (msg.metadata.dst_node_id == self.node_ids[0] and msg.metadata.message_type == MessageType.TRAIN
                and int(msg.content[CONFIG]["server-round"]) == 2):
            self.sent.append(msg)
            return Message(Error(code=0, reason="node crashed"), reply_to=msg)
        return super().respond(msg)


@needs_fmnist
def test_a_four_bit_delta_run_keeps_every_node_on_the_servers_chain(tmp_path: Path) -> None:
    overrides = {"strategy.name": "udec", "transport.dtype": "int4", "transport.payload": "delta",
                 "transport.error-feedback": True, "train.rounds": 3, "eval.every": 0}
    run = _FlakyRun(tiny_config(tmp_path, **overrides), node_ids=[101, 108, 115])
    _, final = run.start()
    chain = run.grid.chain  # type: ignore[attr-defined]
    assert all(torch.isfinite(v).all() for v in decode_record(final).values())
    model = build_model(run.cfg, seed=run.cfg.seed)
    keys = shared_keys(run.cfg.strategy.name, unet_parts(model))
    train = [m for m in run.sent if m.metadata.message_type == MessageType.TRAIN]
    bases = {(int(m.content[CONFIG]["server-round"]), m.metadata.dst_node_id): m.content[CONFIG][TRANSPORT_BASE]
             for m in train}
    assert {bases[(1, n)] for n in run.node_ids} == {0}  # the seeded initialization, no arrays
    assert all(len(m.content[ARRAYS]) == 0 for m in train if m.content[CONFIG]["server-round"] == 1)
    # Node 101 failed round 2: the next message it gets carries a version whole; the others stay on deltas.
    after = [m for m in run.sent if m.metadata.dst_node_id == 101 and int(m.content[CONFIG]["server-round"]) >= 2]
    assert after[0].metadata.message_type == MessageType.TRAIN and after[1].content[CONFIG][TRANSPORT_BASE] == RESYNC
    others = [m.content[CONFIG][TRANSPORT_BASE] for m in run.sent if m.metadata.dst_node_id != 101]
    assert RESYNC not in others
    for node in run.node_ids:
        saved = load_node_round(run.state_dir(node), REFERENCE)
        assert saved is not None and saved["round"] == chain.version == 3  # round 3 evaluate sent version 3
        assert all(torch.equal(saved["arrays"][k], chain.reference[k]) for k in keys)  # type: ignore[index]
        residual = load_node_round(run.state_dir(node), RESIDUAL)
        assert residual is not None and residual["round"] == 3 and set(residual["arrays"]) >= set(keys)  # type: ignore[arg-type]
    # Bytes on the wire: every upload is the analytic size of the shared arrays at 4 bits.
    state = model.state_dict()
    upload = sum(payload_bytes(tuple(state[k].shape), "int4", True) for k in keys)
    whole = arrays_size(encode_state(chain.reference))[1]  # float32, with npy headers
    expected = 0
    for m in run.sent:
        config = m.content[CONFIG]
        base, version = config[TRANSPORT_BASE], config[TRANSPORT_VERSION]
        size = 0 if base == version else whole if base == RESYNC else upload
        assert arrays_size(m.content[ARRAYS])[1] == size, (m.metadata.message_type, base, version)
        expected += size
    totals = run.ledger.totals()
    assert totals["down_bytes"] == expected
    assert run.ledger.totals(message_type=MessageType.TRAIN)["up_bytes"] == (3 + 2 + 3) * upload
    weights_run, _, _ = run_inprocess(tmp_path / "weights", nodes=3, **{**overrides, "transport.payload": "weights",
                                                                         "transport.error-feedback": False})
    assert weights_run.ledger.totals(server_round=1, message_type=MessageType.TRAIN)["up_bytes"] == 3 * upload


@needs_fmnist
def test_a_delta_run_from_a_checkpoint_starts_private_parts_from_it(tmp_path: Path) -> None:
    """The checkpoint's encoder and bottleneck reach each UDec node whole (frozen here, so they stay)."""
    overrides = {"strategy.name": "udec", "transport.dtype": "int8", "transport.payload": "delta",
                 "train.rounds": 1, "eval.every": 0, "train.scope": "shared"}
    run = InProcessRun(tiny_config(tmp_path, **overrides), node_ids=[101, 108])
    checkpoint = build_model(run.cfg, seed=run.cfg.seed + 7).state_dict()
    run.start(encode_state(checkpoint))
    keep = [k for k in checkpoint if k not in shared_keys("udec", unet_parts(checkpoint))]
    seeded = build_model(run.cfg, seed=run.cfg.seed).state_dict()
    assert keep and not torch.equal(checkpoint[keep[0]], seeded[keep[0]])
    for node in run.node_ids:
        saved = load_node_model(run.state_dir(node))
        assert saved is not None and all(torch.equal(saved["model"][k], checkpoint[k]) for k in keep)  # type: ignore[index]
