"""Fuzzing the server: malformed replies mixed with good ones never crash or poison aggregation.

For Full, USplit, ULatDec, UDec and CollaFuse, hypothesis builds rounds of two or three good
replies and up to a dozen bad ones (stypes, byte strings, shapes, dtypes, weights, extra,
missing and duplicated records), each bad reply broken in one or more ways. Every round
checks that aggregation does not raise, that each bad reply is dropped with a logged reason,
that the model keeps its keys, shapes and dtype and stays finite, and that the result is what
the good replies alone give: their example-weighted average, or for CollaFuse the server's
model trained on their uploads alone. Each strategy sees at least ``REPLIES`` replies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import strategies.collafuse as collafuse_strategy
from fedapp.config import parse_config
from fedapp.log import LOGGER
from fedapp.model.unet import UNet, unet_parts
from fedapp.protocol.keys import UPLOAD
from fedapp.protocol.methods import parts_keys
from fedapp.protocol.records import model_to_record
from strategies import CollaFuse, Full, UDec, ULatDec, USplit
from tests.support.mocks import FakeGrid, reply_from

pytestmark = pytest.mark.usefixtures("task_identity")

REPLIES = 10_000  # per strategy
MAX_EXAMPLES = 1000  # strategy.max-num-examples in these rounds
FUZZ = settings(max_examples=360, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# -- ways to break a reply ------------------------------------------------------------------------
# what Flower's MetricRecord can carry (no bools or strings): non-finite, non-positive, fractional, too big,
# lists, and no weight at all
BAD_WEIGHTS = [float("nan"), float("inf"), -float("inf"), 0, -3, 2.5, MAX_EXAMPLES + 1, 2**63, [1, 2], [10.0], None]
BREAKS = ["nan", "inf", "shape", "dtype", "stype", "bytes", "lying shape", "lying dtype", "missing key",
          "extra key", "no arrays", "renamed arrays", "two array records", "weight", "no metrics",
          "two metric records"]


def _any_array(draw: st.DrawFn) -> Array:
    """An array record entry of random metadata and random bytes."""
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    return Array(draw(st.sampled_from(["float32", "float64", "int8", "bfloat16", "object", ""])), shape,
                 draw(st.sampled_from(["numpy.ndarray", "fedapp.raw-bfloat16", "pickle", ""])),
                 draw(st.binary(max_size=64)))


class Template(dict):  # type: ignore[type-arg]
    """A good reply's arrays; a short repr keeps hypothesis's reports (and its speed) sane."""

    def __repr__(self) -> str:
        return f"Template({len(self)} arrays)"


def _lying(claimed: tuple[int, ...], dtype: str, held: np.ndarray) -> Array:
    return Array(dtype, claimed, "numpy.ndarray", Array(held).data)


@st.composite
def broken(draw: st.DrawFn, arrays: dict[str, np.ndarray], arrays_key: str) -> RecordDict:
    """A reply made from a good one (``arrays``, 10 examples) with one to three breaks."""
    values: dict[str, Array | np.ndarray] = dict(arrays)
    records: dict[str, object] = {}
    weight: object = 10
    metric_records = 1
    for kind in draw(st.lists(st.sampled_from(BREAKS), min_size=1, max_size=3, unique=True)):
        key = draw(st.sampled_from(sorted(arrays)))
        good = arrays[key]
        if kind in ("nan", "inf"):
            bad = good.astype(np.float32)
            bad.flat[draw(st.integers(0, bad.size - 1))] = np.nan if kind == "nan" else -np.inf
            values[key] = bad
        elif kind == "shape":
            shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
            values[key] = np.zeros(shape if shape != good.shape else (*shape, 2), np.float32)
        elif kind == "dtype":
            values[key] = good.astype(draw(st.sampled_from([np.float64, np.int32, np.int64, np.bool_, np.uint8]).filter(
                lambda dtype, current=good.dtype: dtype != current)))
        elif kind == "stype":
            values[key] = Array("float32", good.shape, draw(st.text(max_size=12).filter(
                lambda s: s not in ("numpy.ndarray", "fedapp.raw-bfloat16"))), Array(good).data)
        elif kind == "bytes":
            values[key] = Array("float32", good.shape, "numpy.ndarray", draw(st.binary(max_size=80)))
        elif kind == "lying shape":
            values[key] = _lying(good.shape, "float32", np.zeros((2, *good.shape), np.float32))
        elif kind == "lying dtype":
            values[key] = _lying(good.shape, "float32", good.astype(np.float64))
        elif kind == "missing key":
            values.pop(key, None)
            if not values:
                values["stray"] = np.zeros(1, np.float32)
        elif kind == "extra key":
            name = draw(st.sampled_from(["extra.weight", "x-t", key + ".more"]))
            values[name] = np.zeros(3, np.float32) if draw(st.booleans()) else _any_array(draw)
        elif kind == "no arrays":
            records["skip-arrays"] = True
        elif kind == "renamed arrays":
            records["arrays-name"] = draw(st.sampled_from(["weights", "Arrays", UPLOAD, ""]).filter(
                lambda s: s != arrays_key))
        elif kind == "two array records":
            records["second"] = ArrayRecord({"x": Array(np.zeros(2, np.float32))})
        elif kind == "weight":
            weight = draw(st.sampled_from(BAD_WEIGHTS))
        elif kind == "no metrics":
            metric_records = 0
        elif kind == "two metric records":
            metric_records = 2
    content = RecordDict()
    if not records.get("skip-arrays"):
        content[str(records.get("arrays-name", arrays_key))] = ArrayRecord(
            {k: v if isinstance(v, Array) else Array(v) for k, v in values.items()})
    if "second" in records:
        content["second"] = records["second"]  # type: ignore[assignment]
    metrics = {"train-loss": 1.0, **({"num-examples": weight} if weight is not None else {})}
    for i in range(metric_records):
        content[f"metrics{'' if i == 0 else i}"] = MetricRecord(metrics)  # type: ignore[arg-type]
    return content


def _good(arrays: dict[str, np.ndarray], examples: int, arrays_key: str, junk: bool) -> RecordDict:
    """A valid reply; ``junk`` adds what must be ignored, not averaged: odd metrics and a config record."""
    metrics: dict[str, object] = {"num-examples": examples, "train-loss": 0.5}
    if junk:
        metrics.update({"odd": float("nan"), "list": [1.0, 2.0]})
    content = RecordDict({arrays_key: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord(metrics)})  # type: ignore[arg-type]
    if junk:
        content["config"] = ConfigRecord({"note": "ignored"})
    return content


class Dropped(logging.Handler):
    """Collects which nodes' replies the strategies logged as dropped."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.nodes: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("dropping reply from node "):
            self.nodes.append(int(record.args[0]))  # type: ignore[index]


@pytest.fixture
def dropped() -> Dropped:
    handler = Dropped()
    LOGGER.addHandler(handler)
    level, LOGGER.level = LOGGER.level, logging.WARNING  # the round's INFO lines are not what is tested
    yield handler
    LOGGER.removeHandler(handler)
    LOGGER.setLevel(level)


def _model() -> ArrayRecord:
    """Four arrays of each part of a real UNet: the strategies see parts by key name, and fewer
    arrays per reply buy more replies per second of CI."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        record = model_to_record(UNet(dim=4, dim_mults=(1,), channels=1))
    keep = [k for keys in unet_parts(dict(record.items())).values() for k in keys[:4]]
    return ArrayRecord({k: record[k] for k in keep})


GLOBAL = _model()
NODES = list(range(1, 41))


def _round(rng: np.random.Generator, good_nodes: list[int], expected_keys: Callable[[int], list[str]], arrays_key: str, junk: list[bool]
           ) -> tuple[list[Message], dict[int, dict[str, np.ndarray]], dict[int, int]]:
    good_arrays = {n: {k: (GLOBAL[k].numpy() + rng.normal(size=GLOBAL[k].shape)).astype(np.float32)
                       for k in expected_keys(n)} for n in good_nodes}
    weights = {n: int(rng.integers(1, MAX_EXAMPLES)) for n in good_nodes}
    replies = [reply_from(n, _good(good_arrays[n], weights[n], arrays_key, j))
               for n, j in zip(good_nodes, junk)]
    return replies, good_arrays, weights


@pytest.mark.parametrize("strategy_class", [Full, USplit, ULatDec, UDec], ids=lambda c: c.__name__)
def test_fedavg_strategies_survive_fuzzed_replies(strategy_class: type, dropped: Dropped) -> None:
    seen = {"replies": 0}
    strategy = strategy_class(min_train_nodes=len(NODES), min_available_nodes=len(NODES),
                              max_num_examples=MAX_EXAMPLES)
    list(strategy.configure_train(1, GLOBAL, ConfigRecord(), FakeGrid(NODES, lambda m: m)))  # the tasks, once

    @FUZZ
    @given(data=st.data(), bad_count=st.integers(len(NODES) // 2, len(NODES) - 3),
           junk=st.lists(st.booleans(), min_size=3, max_size=3), seed=st.integers(0, 2**31 - 1))
    def fuzz(data: st.DataObject, bad_count: int, junk: list[bool], seed: int) -> None:
        def expected_keys(node: int) -> list[str]:
            if isinstance(strategy, Full):
                return list(GLOBAL.keys())
            return parts_keys(strategy.tasks[node], strategy._keys)  # noqa: SLF001 - the node's task

        rng = np.random.default_rng(seed)
        good_nodes = sorted(rng.choice(NODES, size=3 if isinstance(strategy, USplit) else 2, replace=False).tolist())
        replies, good_arrays, weights = _round(rng, good_nodes, expected_keys, strategy.arrayrecord_key, junk)
        bad_nodes = [n for n in NODES if n not in good_nodes][:bad_count]
        for node in bad_nodes:
            template = Template({k: GLOBAL[k].numpy().copy() for k in expected_keys(node)})
            replies.append(reply_from(node, data.draw(broken(template, strategy.arrayrecord_key))))
        seen["replies"] += len(replies)
        dropped.nodes.clear()
        arrays, _ = strategy.aggregate_train(1, replies[::-1] if seed % 2 else replies)

        assert sorted(dropped.nodes) == bad_nodes, "every bad reply is dropped, with a reason, and no good one"
        assert arrays is not None
        assert {k: (tuple(v.shape), v.dtype) for k, v in arrays.items()} == {
            k: (tuple(v.shape), v.dtype) for k, v in GLOBAL.items()}, "a client changed the model's keys or shapes"
        for key in GLOBAL.keys():
            got = arrays[key].numpy()
            assert np.isfinite(got).all(), key
            reporters = [n for n in good_nodes if key in good_arrays[n]]
            if not reporters:
                np.testing.assert_array_equal(got, GLOBAL[key].numpy(), err_msg=key)
                continue
            total = sum(weights[n] for n in reporters)
            expected = sum(good_arrays[n][key].astype(np.float64) * weights[n] for n in reporters) / total
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=key)

    fuzz()
    print(f"{seen['replies']} replies fuzzed")
    assert seen["replies"] >= REPLIES, seen


# -- CollaFuse ---------------------------------------------------------------------------------------
SIDE, CUT = 8, 5
COLLAFUSE_CONFIG = parse_config({
    "strategy.name": "collafuse", "model.dim": 4, "model.dim-mults": "1", "data.image-size": SIDE,
    "diffusion.timesteps": 10, "eval.sampler-steps": 10, "collafuse.cut-ratio": 0.5, "collafuse.upload-samples": 4,
    "collafuse.server-epochs": 1, "train.batch-size": 4, "train.device": "cpu", "strategy.max-num-examples": MAX_EXAMPLES,
})


def _upload(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {"x-t": rng.normal(size=(n, 1, SIDE, SIDE)).astype(np.float32),
            "t": rng.integers(CUT, 10, size=n).astype(np.int64),
            "target": rng.normal(size=(n, 1, SIDE, SIDE)).astype(np.float32)}


def test_collafuse_survives_fuzzed_uploads(dropped: Dropped, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server trains on exactly the good uploads, in node order (``server_steps`` records them here;
    the training itself is tested in tests/test_collafuse.py)."""
    assert COLLAFUSE_CONFIG.collafuse.cut(10) == CUT
    trained: list[tuple[torch.Tensor, ...]] = []

    def record_steps(model: object, optimizer: object, diffusion: object, *tensors: torch.Tensor,
                     **_: object) -> SimpleNamespace:
        trained.append(tensors)
        return SimpleNamespace(loss=1.0, steps=1, seconds=0.0)

    monkeypatch.setattr(collafuse_strategy, "server_steps", record_steps)
    strategy = CollaFuse(COLLAFUSE_CONFIG, min_train_nodes=len(NODES), min_available_nodes=len(NODES))
    strategy.configure_train(1, model_to_record(strategy.model), ConfigRecord(), FakeGrid(NODES, lambda m: m))
    seen = {"replies": 0}

    @FUZZ
    @given(data=st.data(), bad_count=st.integers(len(NODES) // 2, len(NODES) - 2),
           junk=st.lists(st.booleans(), min_size=2, max_size=2),
           seed=st.integers(0, 2**31 - 1))
    def fuzz(data: st.DataObject, bad_count: int, junk: list[bool], seed: int) -> None:
        rng = np.random.default_rng(seed)
        good_nodes = sorted(rng.choice(NODES, size=2, replace=False).tolist())
        good = {n: _upload(rng, int(rng.integers(1, 5))) for n in good_nodes}
        weights = {n: int(rng.integers(1, MAX_EXAMPLES)) for n in good_nodes}
        replies = [reply_from(n, _good(good[n], weights[n], UPLOAD, j)) for n, j in zip(good_nodes, junk)]
        bad_nodes = [n for n in NODES if n not in good_nodes][:bad_count]
        for node in bad_nodes:
            content = data.draw(broken(Template(_upload(rng, 2)), UPLOAD) | st.sampled_from(["t low", "t high", "too many"]).map(
                lambda kind: _good({**_upload(rng, 5 if kind == "too many" else 2),
                                    **({"t": np.array([CUT - 1, CUT] if kind == "t low" else [CUT, 10])}
                                       if kind != "too many" else {})}, 10, UPLOAD, False)))
            replies.append(reply_from(node, content))
        seen["replies"] += len(replies)
        dropped.nodes.clear()
        trained.clear()
        arrays, metrics = strategy.aggregate_train(1, replies[::-1] if seed % 2 else replies)
        assert sorted(dropped.nodes) == bad_nodes, "every bad upload is dropped, with a reason, and no good one"
        assert arrays is not None and metrics is not None and len(trained) == 1
        for got, key in zip(trained[0], ("x-t", "t", "target")):
            np.testing.assert_array_equal(got.numpy(), np.concatenate([good[n][key] for n in good_nodes]), err_msg=key)
        assert metrics["server-samples"] == sum(len(good[n]["t"]) for n in good_nodes)

    fuzz()
    print(f"{seen['replies']} replies fuzzed")
    assert seen["replies"] >= REPLIES, seen
