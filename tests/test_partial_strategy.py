"""The part-wise strategies (USplit, ULatDec, UDec, and PartFedAvg as Full) on mocked replies.

The arrays are the state of a real (tiny) UNet, so the part boundaries are the real ones.
A client's reply is the arrays it was sent for its reported keys, shifted by a constant of
its own (``node / 100``), so every average can be worked out by hand.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
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
from fedapp.model.unet import UNet, unet_parts
from fedapp.protocol.methods import ALL_PARTS, SHARED_PARTS, parts_keys, private_parts
from fedapp.protocol.metrics import mean_std_over_clients, weighted_mean_over_clients
from fedapp.protocol.records import model_to_record
from strategies import STRATEGIES, Full, build_strategy
from strategies.partial import PartFedAvg, UDec, ULatDec, USplit
from tests.support.mocks import FakeGrid, reply_from

pytestmark = pytest.mark.usefixtures("task_identity")

with torch.random.fork_rng():  # a fixed model, without touching the global RNG of other tests
    torch.manual_seed(0)
    MODEL = UNet(dim=8, dim_mults=(1, 2), channels=1)
PART_KEYS = unet_parts(MODEL)
ALL_KEYS = list(MODEL.state_dict())
NODES = [1, 2, 3, 4]
EXAMPLES = {1: 10, 2: 20, 3: 30, 4: 40}
LOSSES = {1: 4.0, 2: 3.0, 3: 2.0, 4: 1.0}

CLASSES: dict[str, type[PartFedAvg]] = {"full": PartFedAvg, "usplit": USplit, "ulatdec": ULatDec, "udec": UDec}
METHODS = list(CLASSES)
PERSONALIZED = ["ulatdec", "udec"]


def initial() -> ArrayRecord:
    return model_to_record(MODEL)


def shift(node: int) -> np.float32:
    return np.float32(node / 100)


def make(method: str, seed: int = 0) -> PartFedAvg:
    """A strategy that samples all four nodes (USplit seeded with ``seed``)."""
    n = len(NODES)
    kwargs: dict[str, object] = {"seed": seed} if method == "usplit" else {}
    return CLASSES[method](min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n, **kwargs)


def idle_grid(nodes: list[int] = NODES) -> FakeGrid:
    def respond(msg: Message) -> Message:
        raise AssertionError("nothing is sent through this grid")

    return FakeGrid(nodes, respond)


def task_keys(strategy: PartFedAvg, node: int) -> list[str]:
    return parts_keys(strategy.tasks[node], PART_KEYS)


def train_reply(msg: Message, keys: list[str], source: ArrayRecord, node: int | None = None,
                examples: int | None = None) -> Message:
    """A reply to ``msg`` carrying ``source[k] + shift(node)`` for ``keys``."""
    node = msg.metadata.dst_node_id if node is None else node
    arrays = ArrayRecord({k: Array(source[k].numpy() + shift(node)) for k in keys})
    metrics = MetricRecord({"num-examples": EXAMPLES.get(node, 1) if examples is None else examples,
                            "train-loss": LOSSES.get(node, 0.0)})
    content = RecordDict({"arrays": arrays, "metrics": metrics})
    if node == msg.metadata.dst_node_id:
        return Message(content, reply_to=msg)
    return reply_from(node, content)


def honest_replies(strategy: PartFedAvg, messages: list[Message]) -> list[Message]:
    return [train_reply(m, task_keys(strategy, m.metadata.dst_node_id), m.content["arrays"]) for m in messages]


def expected_shift(reporters: list[int]) -> float:
    return sum(EXAMPLES[n] * float(shift(n)) for n in reporters) / sum(EXAMPLES[n] for n in reporters)


def check_merged(merged: ArrayRecord, base: ArrayRecord, reporters: dict[str, list[int]]) -> None:
    """Each part: base + weighted shift over its reporters, or exactly base when none reported it."""
    assert sorted(merged.keys()) == sorted(ALL_KEYS)
    for part in ALL_PARTS:
        for key in PART_KEYS[part]:
            got, before = merged[key].numpy(), base[key].numpy()
            assert got.shape == before.shape and got.dtype == before.dtype == np.float32, key
            if reporters[part]:
                np.testing.assert_allclose(got, before.astype(np.float64) + expected_shift(reporters[part]),
                                           rtol=1e-6, atol=1e-6, err_msg=key)
            else:
                np.testing.assert_array_equal(got, before, err_msg=key)


def reporters_of(strategy: PartFedAvg, nodes: list[int]) -> dict[str, list[int]]:
    return {p: [n for n in nodes if p in strategy.tasks[n]] for p in ALL_PARTS}


# -- what is sent ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_first_round_sends_the_whole_model_and_each_node_its_task(method: str) -> None:
    strategy, arrays = make(method, seed=3), initial()
    messages = list(strategy.configure_train(1, arrays, ConfigRecord({"lr": 0.5}), idle_grid()))

    assert sorted(m.metadata.dst_node_id for m in messages) == NODES
    assert sorted(strategy.tasks) == NODES
    for msg in messages:
        node = msg.metadata.dst_node_id
        assert msg.metadata.message_type == MessageType.TRAIN
        sent = msg.content["arrays"]
        assert list(sent.keys()) == ALL_KEYS
        for key in ALL_KEYS:
            np.testing.assert_array_equal(sent[key].numpy(), arrays[key].numpy())
        config = msg.content["config"]
        assert config["report-parts"] == ",".join(strategy.tasks[node])
        assert config["server-round"] == 1 and config["lr"] == 0.5
        if method != "usplit":
            assert strategy.tasks[node] == SHARED_PARTS[method]
        else:
            assert strategy.tasks[node] and set(strategy.tasks[node]) < set(ALL_PARTS)


@pytest.mark.parametrize("method", METHODS)
def test_after_a_successful_round_only_the_shared_parts_are_sent(method: str) -> None:
    strategy = make(method)
    grid = idle_grid()
    # Before any training, evaluation sends the whole model too.
    for msg in strategy.configure_evaluate(1, initial(), ConfigRecord(), grid):
        assert list(msg.content["arrays"].keys()) == ALL_KEYS

    messages = list(strategy.configure_train(1, initial(), ConfigRecord(), grid))
    merged, _ = strategy.aggregate_train(1, honest_replies(strategy, messages))
    assert merged is not None
    assert strategy.initialized == set(NODES)

    shared = parts_keys(SHARED_PARTS[method], PART_KEYS)
    evaluate = list(strategy.configure_evaluate(1, merged, ConfigRecord({"x": 1}), grid))
    train = list(strategy.configure_train(2, merged, ConfigRecord(), grid))
    assert sorted(m.metadata.dst_node_id for m in evaluate) == NODES
    assert sorted(m.metadata.dst_node_id for m in train) == NODES
    for msg in evaluate + train:
        sent = msg.content["arrays"]
        assert list(sent.keys()) == shared
        for key in shared:
            np.testing.assert_array_equal(sent[key].numpy(), merged[key].numpy())
    for msg in evaluate:
        assert msg.metadata.message_type == MessageType.EVALUATE
        assert msg.content["config"]["x"] == 1
    for msg in train:
        node = msg.metadata.dst_node_id
        assert msg.metadata.message_type == MessageType.TRAIN
        assert msg.content["config"]["report-parts"] == ",".join(strategy.tasks[node])
        assert msg.content["config"]["server-round"] == 2
    if method in PERSONALIZED:
        assert len(shared) < len(ALL_KEYS)


@pytest.mark.parametrize("method", PERSONALIZED)
def test_nodes_whose_reply_was_dropped_get_the_whole_model_again(method: str) -> None:
    strategy = make(method)
    messages = list(strategy.configure_train(1, initial(), ConfigRecord(), idle_grid()))
    replies = [r for r in honest_replies(strategy, messages) if r.metadata.src_node_id in (1, 2)]
    replies.append(reply_from(3, error=Error(code=1, reason="crashed")))
    merged, _ = strategy.aggregate_train(1, replies)
    assert merged is not None
    assert strategy.initialized == {1, 2}

    shared = parts_keys(SHARED_PARTS[method], PART_KEYS)
    for msg in strategy.configure_train(2, merged, ConfigRecord(), idle_grid()):
        expected = shared if msg.metadata.dst_node_id in (1, 2) else ALL_KEYS
        assert list(msg.content["arrays"].keys()) == expected


# -- what is averaged -----------------------------------------------------------------------
@pytest.mark.parametrize("method,seed", [("full", 0), ("ulatdec", 0), ("udec", 0),
                                         ("usplit", 0), ("usplit", 1), ("usplit", 2), ("usplit", 3)])
def test_each_part_is_the_weighted_mean_over_its_reporters(method: str, seed: int) -> None:
    strategy = make(method, seed=seed)
    arrays = initial()
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), idle_grid()))
    merged, metrics = strategy.aggregate_train(1, honest_replies(strategy, messages))

    assert merged is not None and metrics is not None
    reporters = reporters_of(strategy, NODES)
    check_merged(merged, arrays, reporters)
    for part in ALL_PARTS:
        assert bool(reporters[part]) == (part in SHARED_PARTS[method])
    if method == "usplit":
        # Pairs split encoder and decoder: two of the four nodes report each.
        assert len(reporters["encoder"]) == len(reporters["decoder"]) == 2
        assert expected_shift(reporters["encoder"]) != pytest.approx(expected_shift(NODES))
    assert metrics["train-loss"] == pytest.approx(sum(EXAMPLES[n] * LOSSES[n] for n in NODES) / 100)


@pytest.mark.parametrize("method", PERSONALIZED)
def test_second_round_averages_what_was_sent_and_keeps_the_rest(method: str) -> None:
    strategy = make(method)
    messages = list(strategy.configure_train(1, initial(), ConfigRecord(), idle_grid()))
    round1, _ = strategy.aggregate_train(1, honest_replies(strategy, messages))
    assert round1 is not None
    messages = list(strategy.configure_train(2, round1, ConfigRecord(), idle_grid()))
    replies = honest_replies(strategy, messages)  # built from the shared-only arrays received
    round2, _ = strategy.aggregate_train(2, replies)

    assert round2 is not None
    check_merged(round2, round1, reporters_of(strategy, NODES))
    init = initial()
    for key in parts_keys(private_parts(method), PART_KEYS):
        np.testing.assert_array_equal(round2[key].numpy(), init[key].numpy())


# -- what is dropped ------------------------------------------------------------------------
def spoil(strategy: PartFedAvg, msg: Message, how: str) -> Message:
    node = msg.metadata.dst_node_id
    keys = task_keys(strategy, node)
    if how == "extra":
        outside = [k for k in ALL_KEYS if k not in keys]
        return train_reply(msg, [*keys, outside[0]], msg.content["arrays"])
    if how == "unknown-key":
        arrays = ArrayRecord({k: msg.content["arrays"][k] for k in keys})
        arrays["not.a.unet.key"] = Array(np.zeros(3, dtype=np.float32))
        return Message(RecordDict({"arrays": arrays,
                                   "metrics": MetricRecord({"num-examples": EXAMPLES[node]})}), reply_to=msg)
    if how == "missing":
        return train_reply(msg, keys[:-1], msg.content["arrays"])
    if how == "error":
        return reply_from(node, error=Error(code=1, reason="boom"))
    raise AssertionError(how)


# A Full task covers every UNet key, so its only possible extra key is an unknown one.
SPOILED = [(m, how) for m in METHODS for how in ("extra", "unknown-key", "missing", "error")
           if (m, how) != ("full", "extra")]


@pytest.mark.parametrize("method,how", SPOILED)
def test_a_reply_that_does_not_match_its_task_is_dropped(method: str, how: str) -> None:
    strategy = make(method, seed=5)
    arrays = initial()
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), idle_grid()))
    by_node = {m.metadata.dst_node_id: m for m in messages}
    replies = honest_replies(strategy, [by_node[n] for n in (1, 2, 3)]) + [spoil(strategy, by_node[4], how)]

    merged, metrics = strategy.aggregate_train(1, replies)

    assert merged is not None and metrics is not None
    check_merged(merged, arrays, reporters_of(strategy, [1, 2, 3]))
    assert strategy.initialized == {1, 2, 3}
    assert metrics["train-loss"] == pytest.approx((10 * 4.0 + 20 * 3.0 + 30 * 2.0) / 60)


@pytest.mark.parametrize("method", METHODS)
def test_a_reply_from_a_node_without_a_task_is_dropped(method: str) -> None:
    strategy = make(method, seed=6)
    arrays = initial()
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), idle_grid()))
    intruder = train_reply(messages[0], parts_keys(ALL_PARTS, PART_KEYS), arrays, node=99, examples=10_000)
    assert intruder.metadata.src_node_id == 99

    merged, _ = strategy.aggregate_train(1, [intruder, *honest_replies(strategy, messages)])

    assert merged is not None
    check_merged(merged, arrays, reporters_of(strategy, NODES))
    assert 99 not in strategy.initialized


@pytest.mark.parametrize("method", METHODS)
def test_when_every_reply_is_dropped_nothing_is_aggregated(method: str) -> None:
    strategy = make(method)
    messages = list(strategy.configure_train(1, initial(), ConfigRecord(), idle_grid()))
    replies = [spoil(strategy, m, how) for m, how in zip(messages, ["missing", "unknown-key", "error", "missing"])]
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert strategy.aggregate_train(1, []) == (None, None)
    assert strategy.initialized == set()


def test_a_reply_with_a_misnamed_array_record_is_dropped() -> None:
    strategy = make("ulatdec")
    arrays = initial()
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), idle_grid()))
    good = honest_replies(strategy, messages[1:])
    bad_msg = messages[0]
    keys = task_keys(strategy, bad_msg.metadata.dst_node_id)
    bad = Message(RecordDict({"weights": ArrayRecord({k: bad_msg.content["arrays"][k] for k in keys}),
                              "metrics": MetricRecord({"num-examples": 5})}), reply_to=bad_msg)

    merged, _ = strategy.aggregate_train(1, [bad, *good])

    assert merged is not None
    check_merged(merged, arrays, reporters_of(strategy, [m.metadata.dst_node_id for m in messages[1:]]))


# -- USplit's draw --------------------------------------------------------------------------
def usplit_tasks(strategy: USplit, rounds: int, nodes: list[int] = NODES) -> list[dict[int, tuple[str, ...]]]:
    out = []
    for r in range(1, rounds + 1):
        messages = list(strategy.configure_train(r, initial(), ConfigRecord(), idle_grid(nodes)))
        for msg in messages:
            assert msg.content["config"]["report-parts"] == ",".join(strategy.tasks[msg.metadata.dst_node_id])
        out.append(dict(strategy.tasks))
    return out


def test_usplit_tasks_are_reproducible_from_the_seed_and_change_across_rounds() -> None:
    first = usplit_tasks(make("usplit", seed=7), 6)
    again = usplit_tasks(make("usplit", seed=7), 6, nodes=NODES[::-1])
    other = usplit_tasks(make("usplit", seed=8), 6)

    assert first == again  # the grid's node order does not matter either
    assert first != other
    distinct = {tuple(sorted(tasks.items())) for tasks in first}
    assert len(distinct) > 1
    node_roles = {tasks[1] for tasks in first}
    assert len(node_roles) > 1


# -- whole runs on the fake grid ------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_start_runs_three_rounds_and_keeps_private_parts_at_their_initial_values(method: str) -> None:
    init = initial()
    tasks: dict[int, dict[int, tuple[str, ...]]] = {}
    received: list[tuple[str, int, int, list[str]]] = []

    def client(msg: Message) -> Message:
        node, mtype = msg.metadata.dst_node_id, msg.metadata.message_type
        config, sent = msg.content["config"], msg.content["arrays"]
        server_round = int(config["server-round"])
        received.append((mtype, server_round, node, list(sent.keys())))
        if mtype == MessageType.EVALUATE:
            metrics = MetricRecord({"num-examples": EXAMPLES[node], "eval-loss": float(node)})
            return Message(RecordDict({"metrics": metrics}), reply_to=msg)
        parts = tuple(str(config["report-parts"]).split(","))
        tasks.setdefault(server_round, {})[node] = parts
        return train_reply(msg, parts_keys(parts, PART_KEYS), sent)

    strategy = make(method, seed=11)
    result = strategy.start(grid=FakeGrid(NODES, client), initial_arrays=init, num_rounds=3)

    assert sorted(result.arrays.keys()) == sorted(ALL_KEYS)
    total = dict.fromkeys(ALL_PARTS, 0.0)
    for server_round in (1, 2, 3):
        for part in ALL_PARTS:
            reporters = [n for n in NODES if part in tasks[server_round][n]]
            total[part] += expected_shift(reporters) if reporters else 0.0
    for part in ALL_PARTS:
        for key in PART_KEYS[part]:
            got = result.arrays[key].numpy()
            if part in private_parts(method):
                np.testing.assert_array_equal(got, init[key].numpy(), err_msg=key)
            else:
                assert total[part] > 0
                np.testing.assert_allclose(got, init[key].numpy().astype(np.float64) + total[part],
                                           rtol=1e-5, atol=1e-5, err_msg=key)

    shared = parts_keys(SHARED_PARTS[method], PART_KEYS)
    assert sorted((t, r, n) for t, r, n, _ in received) == sorted(
        (t, r, n) for t in ("train", "evaluate") for r in (1, 2, 3) for n in NODES)
    for mtype, server_round, _, keys in received:
        expected = ALL_KEYS if (mtype, server_round) == ("train", 1) else shared
        assert keys == expected, (mtype, server_round)

    assert sorted(result.evaluate_metrics_clientapp) == [1, 2, 3]
    evaluated = result.evaluate_metrics_clientapp[3]
    if method in PERSONALIZED:
        assert evaluated["eval-loss"] == pytest.approx(2.5)
        assert evaluated["eval-loss-std"] == pytest.approx(math.sqrt(1.25))
        assert evaluated["clients"] == 4
    else:
        assert evaluated["eval-loss"] == pytest.approx(3.0)  # weighted by num-examples
        assert "eval-loss-std" not in evaluated
    assert result.train_metrics_clientapp[3]["train-loss"] == pytest.approx(2.0)


# -- evaluation metrics of personal models --------------------------------------------------
def eval_content(loss: float, examples: int) -> RecordDict:
    return RecordDict({"metrics": MetricRecord({"num-examples": examples, "eval-loss": loss})})


def test_mean_std_over_clients_is_unweighted_with_population_std() -> None:
    records = [eval_content(1.0, 100), eval_content(2.0, 1), eval_content(4.0, 1)]
    out = mean_std_over_clients(records, "num-examples")

    assert out["eval-loss"] == pytest.approx(7 / 3)
    assert out["eval-loss-std"] == pytest.approx(math.sqrt(14 / 9))
    assert out["eval-loss-std"] == pytest.approx(statistics.pstdev([1.0, 2.0, 4.0]))
    assert out["clients"] == 3
    assert "num-examples" not in out and "num-examples-std" not in out

    single = mean_std_over_clients([eval_content(5.0, 3)], "num-examples")
    assert single["eval-loss"] == 5.0 and single["eval-loss-std"] == 0.0 and single["clients"] == 1


@pytest.mark.parametrize("name", ["full", "usplit", "ulatdec", "udec"])
def test_build_strategy_wires_mean_std_only_for_personalized_methods(name: str) -> None:
    strategy = build_strategy(parse_config({"strategy.name": name}))
    if name in PERSONALIZED:
        assert strategy.evaluate_metrics_aggr_fn is mean_std_over_clients
    else:
        assert strategy.evaluate_metrics_aggr_fn is weighted_mean_over_clients
    records = [eval_content(1.0, 10), eval_content(3.0, 30)]
    out = strategy.evaluate_metrics_aggr_fn(records, strategy.weighted_by_key)
    assert out["eval-loss"] == pytest.approx(2.0 if name in PERSONALIZED else 2.5)


def test_an_explicit_evaluate_aggregator_is_kept() -> None:
    def mine(records: list[RecordDict], key: str) -> MetricRecord:
        return MetricRecord({"n": len(records)})

    assert UDec(evaluate_metrics_aggr_fn=mine).evaluate_metrics_aggr_fn is mine


# -- build_strategy -------------------------------------------------------------------------
@pytest.mark.parametrize("name,cls", [("full", Full), ("usplit", USplit), ("ulatdec", ULatDec), ("udec", UDec)])
def test_build_strategy_returns_the_class_of_each_name(name: str, cls: type) -> None:
    strategy = build_strategy(parse_config({"strategy.name": name}))
    assert type(strategy) is cls
    assert STRATEGIES[name] is cls
    assert strategy.method == name


def test_build_strategy_seeds_usplit_from_the_config() -> None:
    built = build_strategy(parse_config({"strategy.name": "usplit", "seed": 5, "strategy.min-nodes": 4}))
    assert isinstance(built, USplit)
    assert usplit_tasks(built, 4) == usplit_tasks(make("usplit", seed=5), 4)


@pytest.mark.parametrize("spoil_how", ["no-weight", "zero-weight", "wrong-shape"])
def test_replies_without_a_usable_weight_or_with_wrong_shapes_are_dropped(spoil_how: str) -> None:
    strategy = make("udec")
    arrays = initial()
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), idle_grid()))
    good = honest_replies(strategy, messages[1:])
    bad_msg = messages[0]
    keys = task_keys(strategy, bad_msg.metadata.dst_node_id)
    sent = {k: bad_msg.content["arrays"][k].numpy() for k in keys}
    if spoil_how == "wrong-shape":
        first = keys[0]
        sent[first] = np.zeros((1,) + sent[first].shape, dtype=np.float32)  # broadcastable, wrong
    metrics = {"no-weight": {"train-loss": 1.0}, "zero-weight": {"num-examples": 0}}.get(
        spoil_how, {"num-examples": 5})
    bad = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in sent.items()}),
                              "metrics": MetricRecord(metrics)}), reply_to=bad_msg)
    merged, _ = strategy.aggregate_train(1, [bad, *good])
    assert merged is not None
    assert bad_msg.metadata.dst_node_id not in strategy.initialized
    assert all(m.metadata.dst_node_id in strategy.initialized for m in messages[1:])
