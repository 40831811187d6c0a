"""MeteredGrid + CommLedger: what a run really sends and receives, per round and client."""

from __future__ import annotations

from collections.abc import Iterable

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
from flwr.supercore.run import Run

from fedapp.model.unet import UNet
from fedapp.protocol.comm import CommLedger, format_summary
from fedapp.protocol.records import arrays_size, model_to_record
from server_app.metering import MeteredGrid
from strategies import Full
from tests.support.mocks import FakeGrid

NODES = (11, 22, 33)
EXAMPLES = {11: 10, 22: 30, 33: 60, 44: 5}
HEADER = 256  # generous bound on the per-array serialization overhead (npy header)


pytestmark = pytest.mark.usefixtures("task_identity")


def client(msg: Message) -> Message:
    """Train: return the arrays (+ node id) and metrics; evaluate: metrics only; node 44 crashes."""
    node = msg.metadata.dst_node_id
    if node == 44:
        return Message(Error(code=1, reason="ClientApp crashed"), reply_to=msg)
    metrics = MetricRecord({"num-examples": EXAMPLES[node], "loss": float(node)})
    if msg.metadata.message_type == MessageType.TRAIN:
        arrays = ArrayRecord({k: Array(v.numpy() + np.float32(node)) for k, v in msg.content["arrays"].items()})
        content = RecordDict({"arrays": arrays, "metrics": metrics})
    else:
        content = RecordDict({"metrics": metrics})
    return Message(content, reply_to=msg)


@pytest.fixture(scope="module")
def unet_record() -> ArrayRecord:
    return model_to_record(UNet(dim=8, dim_mults=(1, 2), channels=1))


def run_two_rounds(initial: ArrayRecord, nodes: Iterable[int] = NODES) -> tuple[MeteredGrid, FakeGrid, CommLedger]:
    nodes = list(nodes)
    fake = FakeGrid(nodes, client)
    ledger = CommLedger()
    metered = MeteredGrid(fake, ledger)
    n = len(nodes)
    Full(min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n).start(
        grid=metered, initial_arrays=initial, num_rounds=2, evaluate_fn=lambda r, a: None,
    )
    return metered, fake, ledger


# -- a metered run ------------------------------------------------------------------------
def test_per_round_and_cumulative_params_and_bytes(unet_record: ArrayRecord) -> None:
    params, nbytes = arrays_size(unet_record)
    n_arrays = len(unet_record)
    assert params == sum(p.numel() for p in UNet(dim=8, dim_mults=(1, 2), channels=1).parameters())
    assert 4 * params < nbytes < 4 * params + HEADER * n_arrays

    _, _, ledger = run_two_rounds(unet_record)

    for server_round in (1, 2):
        train = ledger.totals(server_round, message_type="train")
        evaluate = ledger.totals(server_round, message_type="evaluate")
        assert train["down_params"] == 3 * params
        assert train["up_params"] == 3 * params
        assert evaluate["down_params"] == 3 * params
        assert evaluate["up_params"] == 0
        assert evaluate["up_bytes"] == 0
        assert train["down_bytes"] == train["up_bytes"] == evaluate["down_bytes"] == 3 * nbytes
        msgs = 3
        assert 4 * params * msgs < train["down_bytes"] < 4 * params * msgs + HEADER * n_arrays * msgs

    one = ledger.totals(1)
    assert one == ledger.totals(2)
    payload = {k: v for k, v in one.items() if not k.endswith("_wire")}
    assert payload == {"down_params": 6 * params, "down_bytes": 6 * nbytes,
                       "up_params": 3 * params, "up_bytes": 3 * nbytes}
    # Serialized, a message weighs its payload plus Flower's object heads and small records.
    for d, msgs in (("down", 6), ("up", 3)):
        assert one[f"{d}_bytes"] < one[f"{d}_wire"] < one[f"{d}_bytes"] + msgs * (400 * n_arrays + 4096)
    assert ledger.totals(upto=1) == one
    assert ledger.totals(upto=2) == {k: 2 * v for k, v in one.items()}
    assert ledger.totals() == ledger.totals(upto=2)
    assert ledger.totals(0) == dict.fromkeys(one, 0)
    assert ledger.message_types() == ["evaluate", "train"]


def test_per_client_totals_are_keyed_by_node_id(unet_record: ArrayRecord) -> None:
    params, nbytes = arrays_size(unet_record)
    _, _, ledger = run_two_rounds(unet_record)
    for server_round in (1, 2):
        per = ledger.per_client(server_round)
        assert list(per) == list(NODES)
        for totals in per.values():
            assert {k: v for k, v in totals.items() if not k.endswith("_wire")} == {
                "down_params": 2 * params, "down_bytes": 2 * nbytes, "up_params": params, "up_bytes": nbytes}
    summary = ledger.round_summary(2)
    assert summary["train"]["round"]["up_params"] == 3 * params  # type: ignore[index]
    assert summary["train"]["cumulative"]["up_params"] == 6 * params  # type: ignore[index]
    assert sorted(summary["per_client"]) == [str(n) for n in NODES]  # type: ignore[arg-type]


def test_every_transfer_is_attributed_to_the_round_it_was_sent_in(unet_record: ArrayRecord) -> None:
    _, fake, ledger = run_two_rounds(unet_record)
    # The fake grid saw: per round, 3 train then 3 evaluate messages.
    assert [(t, r) for t, r, _ in fake.log] == [
        (t, r) for r in (1, 2) for t in ("train", "evaluate") for _ in NODES
    ]
    downs = [(t.message_type, t.server_round, t.node_id) for t in ledger.transfers if t.direction == "down"]
    assert downs == fake.log
    ups = [(t.message_type, t.server_round, t.node_id) for t in ledger.transfers if t.direction == "up"]
    assert sorted(ups) == sorted(fake.log)
    assert len(ledger.transfers) == 2 * 2 * 2 * len(NODES)
    assert {t.server_round for t in ledger.transfers} == {1, 2}


def test_round_metrics_keeps_only_successful_replies(unet_record: ArrayRecord) -> None:
    params, _ = arrays_size(unet_record)
    metered, _, ledger = run_two_rounds(unet_record, nodes=(11, 22, 33, 44))
    for server_round in (1, 2):
        for mtype in ("train", "evaluate"):
            kept = metered.round_metrics(server_round, mtype)
            assert len(kept) == 3
            for content in kept:
                assert isinstance(content, RecordDict)
                assert not content.array_records  # metrics only, no arrays kept
                assert set(content.metric_records) == {"metrics"}
            assert sorted(int(c["metrics"]["num-examples"]) for c in kept) == [10, 30, 60]
        # The crashed node is metered as an empty upload; it still got the model.
        per = ledger.per_client(server_round)
        assert per[44]["up_params"] == 0 and per[44]["up_bytes"] == 0
        assert per[44]["down_params"] == 2 * params
        assert ledger.totals(server_round, message_type="train")["up_params"] == 3 * params
    assert metered.round_metrics(3, "train") == []
    # The returned list is a copy: callers cannot change what the grid holds.
    metered.round_metrics(1, "train").clear()
    assert len(metered.round_metrics(1, "train")) == 3


def test_format_summary_has_a_line_per_message_type_and_all(unet_record: ArrayRecord) -> None:
    params, nbytes = arrays_size(unet_record)
    _, _, ledger = run_two_rounds(unet_record)
    lines = format_summary(ledger).splitlines()
    assert len(lines) == 4  # header, evaluate, train, all
    by_name = {line.split()[0]: line for line in lines[1:]}
    assert set(by_name) == {"train", "evaluate", "all"}
    train = by_name["train"].split()
    assert train[1] == f"{6 * params:,}" and train[3] == f"{6 * params:,}"
    assert train[2] == f"{ledger.totals(message_type='train')['down_wire'] / 1e6:.2f}"
    evaluate = by_name["evaluate"].split()
    assert evaluate[1] == f"{6 * params:,}" and evaluate[3] == "0" and evaluate[4] == "0.00"
    assert by_name["all"].split()[1] == f"{12 * params:,}"


def test_format_summary_of_an_empty_ledger() -> None:
    lines = format_summary(CommLedger()).splitlines()
    assert len(lines) == 2
    assert lines[1].split() == ["all", "0", "0.00", "0", "0.00"]


# -- delegation ---------------------------------------------------------------------------
def test_metered_grid_delegates_to_the_inner_grid() -> None:
    fake = FakeGrid([5, 6, 7], client)
    metered = MeteredGrid(fake, CommLedger())
    assert list(metered.get_node_ids()) == [5, 6, 7]
    assert [n.node_id for n in metered.get_nodes()] == [5, 6, 7]
    run = Run.create_empty(99)
    metered.set_run(run)
    assert fake.run is run and metered.run is run

    msg = metered.create_message(RecordDict(), "query", 6, "g-1", ttl=30.0)
    assert msg.metadata.dst_node_id == 6
    assert msg.metadata.message_type == "query"
    assert msg.metadata.group_id == "g-1"
    assert msg.metadata.ttl == 30.0
    assert fake.sent == []  # creating is not sending


def test_push_and_pull_are_metered_too() -> None:
    fake = FakeGrid([11, 22], client)
    ledger = CommLedger()
    metered = MeteredGrid(fake, ledger)
    arrays = ArrayRecord({"w": Array(np.ones((3, 5), np.float32))})
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 5})})
    messages = [metered.create_message(content, MessageType.TRAIN, n, "5") for n in (11, 22)]

    ids = list(metered.push_messages(messages))
    assert len(ids) == 2 and len(fake.sent) == 2
    assert [(t.server_round, t.node_id, t.direction, t.params) for t in ledger.transfers] == [
        (5, 11, "down", 15), (5, 22, "down", 15),
    ]

    replies = list(metered.pull_messages(ids))
    assert sorted(r.metadata.src_node_id for r in replies) == [11, 22]
    ups = [t for t in ledger.transfers if t.direction == "up"]
    assert sorted((t.server_round, t.node_id, t.params) for t in ups) == [(5, 11, 15), (5, 22, 15)]
    assert len(metered.round_metrics(5, "train")) == 2

    # A message without a server-round goes to the last round seen.
    metered.push_messages([metered.create_message(RecordDict(), "query", 11, "")])
    assert ledger.transfers[-1].server_round == 5
    assert ledger.transfers[-1].params == 0


def test_superlink_errors_are_the_nodes_and_a_timed_out_node_is_named(
        unet_record: ArrayRecord, caplog: pytest.LogCaptureFixture) -> None:
    """The SuperLink writes 'node unavailable' replies as node 1; a node that never answers has no reply at all."""
    def respond(msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        if node == 22:
            reply = Message(Error(code=3, reason="Node unavailable"), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = 1  # what Flower's SuperLink sends
            return reply
        return client(msg)

    class Silent33(FakeGrid):
        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
            return [m for m in super().pull_messages(message_ids) if m.metadata.src_node_id != 33]

    ledger = CommLedger()
    metered = MeteredGrid(Silent33(NODES, respond), ledger)  # type: ignore[arg-type]
    messages = [metered.create_message(RecordDict({"arrays": unet_record, "config": ConfigRecord({"server-round": 1})}),
                                       MessageType.TRAIN, node, "1") for node in NODES]
    with caplog.at_level("WARNING"):
        replies = list(metered.send_and_receive(messages, timeout=5))
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 11]
    assert metered.round_errors(1, "train") == [(22, "Node unavailable"),
                                                (33, "no reply within strategy.round-timeout = 5 s")]
    assert "round 1: node 33 dropped from the train phase: no reply within strategy.round-timeout = 5 s" in caplog.text
    assert sorted({row["node_id"] for row in ledger.rows() if row["direction"] == "up"}) == [11, 22]  # type: ignore[type-var]
