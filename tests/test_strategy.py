"""The ``Full`` strategy (FedAvg over every array) on mocked Flower replies, without Ray.

The mocks (``FakeGrid``, ``reply_from``) live in tests/support/mocks.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedapp.config import parse_config
from strategies import STRATEGIES, Full, build_strategy
from tests.support.mocks import FakeGrid, reply_from

pytestmark = pytest.mark.usefixtures("task_identity")


def record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def client_arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "a": rng.normal(size=(2, 3)).astype(np.float32),
        "b": rng.normal(size=(4,)).astype(np.float32),
    }


def train_content(arrays: dict[str, np.ndarray], num_examples: int, loss: float) -> RecordDict:
    return RecordDict({
        "arrays": record(arrays),
        "metrics": MetricRecord({"num-examples": num_examples, "train-loss": loss}),
    })


EXAMPLES = {11: 10, 22: 30, 33: 60}
LOSSES = {11: 1.0, 22: 2.0, 33: 4.0}


def weighted(values: dict[int, np.ndarray | float], weights: dict[int, int]) -> np.ndarray:
    total = sum(weights.values())
    return sum(np.asarray(values[n], dtype=np.float64) * weights[n] for n in weights) / total


# -- aggregate_train ----------------------------------------------------------------------
def test_full_is_a_fedavg_registered_as_full() -> None:
    from flwr.serverapp.strategy import FedAvg

    assert issubclass(Full, FedAvg)
    assert STRATEGIES["full"] is Full
    assert Full.method == "full"


def test_aggregate_train_is_the_example_weighted_mean() -> None:
    per_node = {n: client_arrays(n) for n in EXAMPLES}
    replies = [reply_from(n, train_content(per_node[n], EXAMPLES[n], LOSSES[n])) for n in EXAMPLES]
    assert [r.metadata.src_node_id for r in replies] == list(EXAMPLES)

    arrays, metrics = Full().aggregate_train(1, replies)

    assert arrays is not None and metrics is not None
    assert set(arrays.keys()) == {"a", "b"}
    for key in ("a", "b"):
        got = arrays[key].numpy()
        expected = weighted({n: per_node[n][key] for n in EXAMPLES}, EXAMPLES)
        assert got.shape == expected.shape
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
        # A plain (unweighted) mean would be a different answer: the weights matter.
        assert not np.allclose(got, np.mean([per_node[n][key] for n in EXAMPLES], axis=0))
    expected_loss = (10 * 1.0 + 30 * 2.0 + 60 * 4.0) / 100
    assert metrics["train-loss"] == pytest.approx(expected_loss)
    assert float(weighted(LOSSES, EXAMPLES)) == pytest.approx(expected_loss)


@pytest.mark.parametrize("method", ["full", "udec"])
def test_the_aggregated_metrics_hold_no_averaged_identifiers(method: str) -> None:
    per_node = {n: client_arrays(n) for n in EXAMPLES}
    replies = []
    for pid, n in enumerate(EXAMPLES):
        content = train_content(per_node[n], EXAMPLES[n], LOSSES[n])
        content["metrics"] = MetricRecord({**content["metrics"], "partition-id": pid, "num-partitions": 3})
        replies.append(reply_from(n, content))
    strategy = STRATEGIES[method]()
    _, metrics = strategy.aggregate_train(1, replies) if method == "full" else (None, strategy.train_metrics_aggr_fn(
        [r.content for r in replies], strategy.weighted_by_key))

    assert metrics is not None and dict(metrics) == {"train-loss": pytest.approx(3.1)}  # (10 + 60 + 240) / 100


def test_errored_reply_is_dropped_and_the_rest_averaged() -> None:
    per_node = {n: client_arrays(n) for n in EXAMPLES}
    good = [reply_from(n, train_content(per_node[n], EXAMPLES[n], LOSSES[n])) for n in EXAMPLES]
    bad = reply_from(44, error=Error(code=1, reason="ClientApp crashed"))
    assert bad.has_error() and not bad.has_content()

    arrays, metrics = Full().aggregate_train(1, [good[0], bad, good[1], good[2]])

    assert arrays is not None and metrics is not None
    for key in ("a", "b"):
        expected = weighted({n: per_node[n][key] for n in EXAMPLES}, EXAMPLES)
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-6, atol=1e-6)
    assert metrics["train-loss"] == pytest.approx(3.1)


def test_only_errored_replies_aggregate_to_nothing() -> None:
    replies = [reply_from(n, error=Error(code=1, reason="boom")) for n in (1, 2)]
    assert Full().aggregate_train(1, replies) == (None, None)


# -- configure_train ----------------------------------------------------------------------
def test_configure_train_sends_the_full_model_to_every_node() -> None:
    grid = FakeGrid([101, 102, 103, 104], respond=lambda m: pytest.fail("nothing is sent here"))
    arrays = record(client_arrays(0))
    config = ConfigRecord({"lr": 0.01})

    messages = list(Full().configure_train(3, arrays, config, grid))

    assert len(messages) == 4
    assert sorted(m.metadata.dst_node_id for m in messages) == [101, 102, 103, 104]
    for msg in messages:
        assert msg.metadata.message_type == MessageType.TRAIN == "train"
        content = msg.content
        assert set(content.array_records) == {"arrays"}
        assert set(content.config_records) == {"config"}
        sent = content["arrays"]
        assert list(sent.keys()) == ["a", "b"]
        for key in ("a", "b"):
            np.testing.assert_array_equal(sent[key].numpy(), arrays[key].numpy())
        assert content["config"]["server-round"] == 3
        assert content["config"]["lr"] == 0.01


# -- build_strategy -----------------------------------------------------------------------
def test_build_strategy_takes_its_settings_from_the_config() -> None:
    cfg = parse_config({
        "strategy.name": "full",
        "strategy.fraction-train": 0.5,
        "strategy.fraction-evaluate": 0.25,
        "strategy.min-nodes": 3,
    })
    strategy = build_strategy(cfg)
    assert type(strategy) is Full
    assert strategy.fraction_train == 0.5
    assert strategy.fraction_evaluate == 0.25
    assert strategy.min_train_nodes == 3
    assert strategy.min_evaluate_nodes == 3
    assert strategy.min_available_nodes == 3
    assert strategy.weighted_by_key == "num-examples"


def test_build_strategy_without_evaluation_needs_no_evaluate_nodes() -> None:
    cfg = parse_config({"strategy.fraction-evaluate": 0.0, "strategy.min-nodes": 4})
    strategy = build_strategy(cfg)
    assert strategy.fraction_evaluate == 0.0
    assert strategy.min_evaluate_nodes == 0
    assert strategy.min_train_nodes == 4
    grid = FakeGrid([1, 2, 3, 4], respond=lambda m: pytest.fail("nothing is sent here"))
    assert list(strategy.configure_evaluate(1, record(client_arrays(0)), ConfigRecord(), grid)) == []


def test_built_strategy_samples_the_configured_fraction() -> None:
    cfg = parse_config({"strategy.fraction-train": 0.5, "strategy.min-nodes": 2})
    grid = FakeGrid([1, 2, 3, 4, 5, 6, 7, 8], respond=lambda m: pytest.fail("nothing is sent here"))
    messages = list(build_strategy(cfg).configure_train(1, record(client_arrays(0)), ConfigRecord(), grid))
    assert len(messages) == 4
    assert len({m.metadata.dst_node_id for m in messages}) == 4


# -- a whole run --------------------------------------------------------------------------
CONSTANTS = {11: 1.0, 22: -2.0, 33: 0.5}


def test_start_runs_two_rounds_of_fedavg_over_the_fake_grid() -> None:
    seen: list[tuple[str, int, int]] = []

    def client(msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        mtype = msg.metadata.message_type
        seen.append((mtype, int(msg.content["config"]["server-round"]), node))
        if mtype == MessageType.TRAIN:
            arrays = msg.content["arrays"]
            new = {k: v.numpy() + np.float32(CONSTANTS[node]) for k, v in arrays.items()}
            content = train_content(new, EXAMPLES[node], LOSSES[node])
        else:
            content = RecordDict({"metrics": MetricRecord({"num-examples": EXAMPLES[node], "eval-loss": 0.5})})
        return Message(content, reply_to=msg)

    evaluated: list[tuple[int, dict[str, np.ndarray]]] = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        evaluated.append((server_round, {k: v.numpy().copy() for k, v in arrays.items()}))
        return MetricRecord({"round-seen": server_round})

    initial = client_arrays(0)
    strategy = Full(min_train_nodes=3, min_evaluate_nodes=3, min_available_nodes=3)
    result = strategy.start(grid=FakeGrid(CONSTANTS, client), initial_arrays=record(initial),
                            num_rounds=2, evaluate_fn=evaluate_fn)

    mean_const = float(weighted(CONSTANTS, EXAMPLES))
    assert mean_const == pytest.approx(-0.2)
    for key in ("a", "b"):
        np.testing.assert_allclose(result.arrays[key].numpy(), initial[key] + 2 * mean_const,
                                   rtol=1e-5, atol=1e-5)

    assert [r for r, _ in evaluated] == [0, 1, 2]
    for server_round, arrays in evaluated:
        for key in ("a", "b"):
            np.testing.assert_allclose(arrays[key], initial[key] + server_round * mean_const,
                                       rtol=1e-5, atol=1e-5)
    assert sorted(result.evaluate_metrics_serverapp) == [0, 1, 2]
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert result.train_metrics_clientapp[2]["train-loss"] == pytest.approx(3.1)
    assert result.evaluate_metrics_clientapp[1]["eval-loss"] == pytest.approx(0.5)

    expected = [(t, r, n) for r in (1, 2) for t in ("train", "evaluate") for n in sorted(CONSTANTS)]
    assert sorted(seen, key=lambda s: (s[1], s[0] != "train", s[2])) == expected
