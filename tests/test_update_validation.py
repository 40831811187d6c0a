"""Bad updates are dropped before averaging, in Full and in the part-wise strategies (UDec here).

Each test injects the same faults beside two good replies and checks that the new
global model is finite and equal to the example-weighted average of the good replies alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict

from fedapp.model.unet import UNet, unet_parts
from fedapp.protocol.quantize import Quantizer, quantize
from fedapp.protocol.records import model_to_record
from strategies import Full
from strategies.partial import UDec
from tests.support.mocks import FakeGrid, reply_from

pytestmark = pytest.mark.usefixtures("task_identity")

GOOD = {11: 10, 22: 30}  # node -> num-examples


def _reply(node: int, arrays: dict[str, np.ndarray], examples: int | float = 10) -> object:
    content = RecordDict({"arrays": ArrayRecord({k: v if isinstance(v, Array) else Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0})})
    return reply_from(node, content)


def _faults(base: dict[str, np.ndarray]) -> list[tuple[str, dict[str, np.ndarray], int | float]]:
    """(name, arrays, num-examples) of each injected fault, built from a well-formed update."""
    first = sorted(base)[0]
    big = next(k for k in sorted(base) if base[k].ndim >= 2 and base[k].shape[0] > 1)

    def changed(key: str, value: np.ndarray) -> dict[str, np.ndarray]:
        return {**base, key: value}

    nan, inf = base[first].copy(), base[first].copy()
    nan.flat[0], inf.flat[0] = np.nan, np.inf
    missing = {k: v for k, v in base.items() if k != first}
    return [
        ("nan", changed(first, nan), 10),
        ("inf", changed(first, inf), 10),
        ("wrong shape", changed(big, np.zeros(base[big].shape[::-1] + (2,), np.float32)), 10),
        ("broadcastable shape", changed(big, np.zeros((1, *base[big].shape[1:]), np.float32)), 10),
        ("missing key", missing, 10),
        ("extra key", {**base, "extra.weight": np.zeros(3, np.float32)}, 10),
        ("1e12 examples", base, 10**12),
        ("NaN examples", base, float("nan")),
        ("Inf examples", base, float("inf")),
        ("negative examples", base, -5),
        ("zero examples", base, 0),
        ("fractional examples", base, 2.5),
        # the bytes disagree with the metadata, which claims the right dtype and shape
        ("bytes of another shape", changed(first, _lying(base[first], np.zeros((2, *base[first].shape), np.float32))), 10),
        ("bytes of another dtype", changed(first, _lying(base[first], base[first].astype(np.float64))), 10),
        ("unknown stype", changed(first, Array("float32", base[first].shape, "pickle", Array(base[first]).data)), 10),
        ("garbage bytes", changed(first, Array("float32", base[first].shape, "numpy.ndarray", b"\x93NUMPY garbage")), 10),
        ("short bfloat16 data", changed(first, Array("bfloat16", base[first].shape, "fedapp.raw-bfloat16", b"\0\0")), 10),
        # quantized payloads (transport.dtype int8 / int4)
        ("short int8 data", changed(big, _quantized(base[big], "int8", cut=1)), 10),
        ("NaN int4 scale", changed(big, _quantized(base[big], "int4", scale=float("nan"))), 10),
        ("zero int8 step", changed(big, _quantized(base[big], "int8", scale=0.0)), 10),
    ]


def _quantized(values: np.ndarray, dtype: str, cut: int = 0, scale: float | None = None) -> Array:
    """``values`` quantized, then ``cut`` bytes short or with its first channel's step set to ``scale``."""
    good = quantize(torch.from_numpy(values), Quantizer(dtype, stochastic=False))  # type: ignore[arg-type]
    data = bytearray(good.data[:len(good.data) - cut])
    if scale is not None:
        channels = values.shape[0]
        data[4 * channels:4 * channels + 4] = np.float32(scale).tobytes()
    return Array(good.dtype, tuple(good.shape), good.stype, bytes(data))


def _lying(claimed: np.ndarray, held: np.ndarray) -> Array:
    """An Array whose metadata describes ``claimed`` but whose bytes are ``held``."""
    return Array(str(claimed.dtype), tuple(claimed.shape), "numpy.ndarray", Array(held).data)


def _check(strategy: object, server_round: int, good: dict[int, dict[str, np.ndarray]],
           base: dict[str, np.ndarray]) -> None:
    bad = [_reply(100 + i, arrays, n) for i, (_, arrays, n) in enumerate(_faults(base))]
    good_replies = [_reply(node, arrays, GOOD[node]) for node, arrays in good.items()]
    arrays, _ = strategy.aggregate_train(server_round, [*bad[:4], *good_replies, *bad[4:]])  # type: ignore[attr-defined]
    assert arrays is not None
    assert {k: (tuple(arrays[k].shape), arrays[k].dtype) for k in base} == {
        k: (tuple(v.shape), "float32") for k, v in base.items()}, "a client changed the model's shapes or dtypes"
    total = sum(GOOD.values())
    for key in base:
        got = arrays[key].numpy()
        expected = sum(good[n][key].astype(np.float64) * GOOD[n] for n in good) / total
        assert np.isfinite(got).all(), key
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=key)


def test_full_drops_every_injected_fault() -> None:
    rng = np.random.default_rng(0)
    shapes = {"a.weight": (4, 3), "b.bias": (4,)}
    global_arrays = ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in shapes.items()})
    strategy = Full(min_train_nodes=1, min_available_nodes=1)
    list(strategy.configure_train(1, global_arrays, ConfigRecord(), FakeGrid([11, 22], lambda m: m)))
    good = {n: {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for n in GOOD}
    _check(strategy, 1, good, good[11])


def test_udec_drops_every_injected_fault_in_its_shared_part() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = UNet(dim=8, dim_mults=(1, 2), channels=1)
    record = model_to_record(model)
    strategy = UDec(min_train_nodes=2, min_available_nodes=2)
    nodes = list(GOOD) + [100 + i for i in range(7)]
    list(strategy.configure_train(1, record, ConfigRecord(), FakeGrid(nodes, lambda m: m)))
    decoder = unet_parts(model)["decoder"]
    rng = np.random.default_rng(1)
    good = {n: {k: (record[k].numpy() + rng.normal(size=record[k].shape)).astype(np.float32) for k in decoder}
            for n in GOOD}
    _check(strategy, 1, good, good[11])


def test_too_few_valid_replies_keep_the_previous_model() -> None:
    strategy = Full(min_valid_replies=2)
    ok = _reply(11, {"a": np.ones(3, np.float32)})
    nan = _reply(22, {"a": np.array([np.nan, 1, 1], np.float32)})
    assert strategy.aggregate_train(1, [ok, nan]) == (None, None)
    arrays, _ = Full(min_valid_replies=1).aggregate_train(1, [ok, nan])
    assert arrays is not None and np.isfinite(arrays["a"].numpy()).all()


def test_errored_replies_still_pass_through_to_flower() -> None:
    from flwr.app import Error
    err = reply_from(33, error=Error(code=0, reason="boom"), message_type=MessageType.TRAIN)
    arrays, _ = Full().aggregate_train(1, [err, _reply(11, {"a": np.ones(2, np.float32)})])
    assert arrays is not None


@pytest.mark.parametrize("kind", ["median", "trimmed-mean"])
def test_robust_aggregation_resists_one_poisoned_client(kind: str) -> None:
    """Five clients, one sending 1e6 everywhere: median / trimmed mean stay among the honest values."""
    honest = {n: np.full(6, 1.0 + n / 100, np.float32) for n in (1, 2, 3, 4)}
    replies = [_reply(n, {"a": v}) for n, v in honest.items()] + [_reply(5, {"a": np.full(6, 1e6, np.float32)})]
    robust, _ = Full(aggregation=kind, trim_fraction=0.2).aggregate_train(1, replies)  # type: ignore[arg-type]
    mean, _ = Full().aggregate_train(1, replies)
    assert robust is not None and mean is not None
    assert 1.01 <= float(robust["a"].numpy().max()) <= 1.04 and float(mean["a"].numpy().min()) > 1e5
    # median: the middle of 1.01..1.04 and 1e6; trimmed mean: cut one from each end, the mean of 1.02..1.04
    np.testing.assert_allclose(robust["a"].numpy(), 1.03, rtol=1e-6)


def test_udec_robust_median_per_part() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = UNet(dim=8, dim_mults=(1, 2), channels=1)
    record = model_to_record(model)
    strategy = UDec(min_train_nodes=3, min_available_nodes=3, aggregation="median")
    list(strategy.configure_train(1, record, ConfigRecord(), FakeGrid([1, 2, 3], lambda m: m)))
    decoder = unet_parts(model)["decoder"]
    offsets = {1: 0.0, 2: 0.01, 3: 1e6}
    replies = [_reply(n, {k: record[k].numpy() + off for k in decoder}) for n, off in offsets.items()]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    for k in decoder:
        np.testing.assert_allclose(arrays[k].numpy(), record[k].numpy() + 0.01, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("task_identity")
def test_replies_are_ordered_by_partition_not_by_flowers_node_ids() -> None:
    """Node ids are drawn anew every run; the aggregation order (and so the float sums) must not follow them."""
    from flwr.app import Error

    from strategies.validation import by_node, claimed_partition

    def reply(node: int, metrics: dict[str, object]) -> object:
        return reply_from(node, RecordDict({"metrics": MetricRecord(metrics)}))  # type: ignore[arg-type]

    replies = [reply(5, {"partition-id": 2}), reply(9, {"partition-id": 0}), reply(1, {"partition-id": 1}),
               reply(7, {"num-examples": 3}), reply_from(3, error=Error(code=0, reason="crashed"))]
    ordered = [m.metadata.src_node_id for m in by_node(replies)]  # type: ignore[arg-type]
    assert ordered == [3, 7, 9, 1, 5]  # no stated partition first (by node id), then partitions 0, 1, 2
    assert claimed_partition(reply(4, {"partition-id": float("nan")})) == -1  # type: ignore[arg-type]
