"""FedDiffuse methods over a whole run in one process: real strategies, real ClientApp handlers.

This is where privacy is checked message by message: the parts a ULatDec/UDec client
keeps never travel after its first round, in either direction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedapp.model.build import build_model
from fedapp.model.unet import part_of, part_sizes
from fedapp.protocol.methods import ALL_PARTS, SHARED_PARTS, private_parts, round_cost
from fedapp.protocol.records import model_to_record
from fedapp.runs.node_state import load_node_model
from tests.support.inprocess import run_inprocess
from tests.support.markers import needs_fmnist

pytestmark = [
    pytest.mark.usefixtures("task_identity"),
    needs_fmnist,
]


def parts_in(keys: object) -> set[str]:
    return {part_of(k) for k in keys}  # type: ignore[attr-defined]


@pytest.mark.parametrize("method", ["ulatdec", "udec"])
def test_private_parts_never_travel_and_persist_on_the_node(tmp_path: Path, method: str) -> None:
    run, initial, final = run_inprocess(tmp_path, nodes=3, **{"strategy.name": method})
    private = set(private_parts(method))
    first_train: dict[int, int] = {}
    for i, msg in enumerate(run.sent):
        node = msg.metadata.dst_node_id
        down = parts_in(msg.content["arrays"].keys())
        if msg.metadata.message_type == MessageType.TRAIN and node not in first_train:
            first_train[node] = i
            assert down == set(ALL_PARTS), "a node's first round starts from the whole global model"
        else:
            assert not down & private, f"{method}: private parts sent down to node {node}"
    for reply in run.replies:
        for record in reply.content.array_records.values():
            assert not parts_in(record.keys()) & private, f"{method}: private parts sent up"

    # The server never learns a private part: the global copy stays the initialization.
    for key in initial.keys():
        if part_of(key) in private:
            assert np.array_equal(final[key].numpy(), initial[key].numpy())

    # Each node's private parts live on its disk, trained, and differ between nodes.
    saved = [load_node_model(run.state_dir(n)) for n in run.node_ids]
    assert all(s is not None and s["round"] == 3 for s in saved)
    key = next(k for k in initial.keys() if part_of(k) in private and initial[k].numpy().ndim > 1)
    init = torch.from_numpy(initial[key].numpy())
    states = [s["model"][key] for s in saved]  # type: ignore[index]
    assert all(not torch.equal(s, init) for s in states)
    assert not torch.equal(states[0], states[1])


def test_a_node_without_its_saved_parts_refuses_to_guess(tmp_path: Path) -> None:
    """Private parts come from disk, not memory: losing them is an error, not a silent reset."""
    run, _, _ = run_inprocess(tmp_path, nodes=2, **{"strategy.name": "udec", "train.rounds": 1})
    for node in run.node_ids:
        (run.state_dir(node) / "model.pt").unlink()
    msg = run.sent[0]
    from flwr.app import ConfigRecord, Message, RecordDict


    model = build_model(run.cfg)
    shared_only = model_to_record(model, keys=[k for k in model.state_dict() if part_of(k) == "decoder"])
    second = Message(RecordDict({"arrays": shared_only, "config": ConfigRecord({"server-round": 2})}),
                     message_type=MessageType.TRAIN, dst_node_id=msg.metadata.dst_node_id)
    with pytest.raises(RuntimeError, match="no saved model of its own"):
        run.respond(second)


@pytest.mark.parametrize("method", ["full", "usplit", "ulatdec", "udec"])
def test_measured_communication_equals_the_analytic_count(tmp_path: Path, method: str) -> None:
    nodes = 4  # even, so USplit's count is exact rather than an expectation
    run, _, _ = run_inprocess(tmp_path, nodes=nodes, **{"strategy.name": method})
    sizes = part_sizes(build_model(run.cfg))
    for rnd in (1, 2, 3):
        measured = run.ledger.totals(rnd, message_type=MessageType.TRAIN)
        expected = round_cost(method, sizes, nodes, first_round=rnd == 1)
        assert measured["down_params"] == expected.down
        assert measured["up_params"] == expected.up


@pytest.mark.parametrize("partitioner", ["iid", "label-skew", "quantity-skew"])
@pytest.mark.parametrize("method", ["full", "usplit", "ulatdec", "udec"])
def test_every_method_runs_under_every_partitioner(tmp_path: Path, method: str, partitioner: str) -> None:
    run, initial, final = run_inprocess(
        tmp_path, nodes=3,
        **{"strategy.name": method, "data.partitioner": partitioner, "train.rounds": 2,
           "data.max-train-examples": 200, "data.min-partition-size": 10},
    )
    assert set(final.keys()) == set(initial.keys())
    assert all(np.isfinite(final[k].numpy()).all() for k in final.keys())
    changed = {part_of(k) for k in final.keys() if not np.array_equal(final[k].numpy(), initial[k].numpy())}
    assert changed == set(SHARED_PARTS[method])
    assert run.result.evaluate_metrics_clientapp[2]["eval-loss"] > 0


def test_shared_scope_freezes_what_a_client_does_not_report(tmp_path: Path) -> None:
    run, initial, _ = run_inprocess(
        tmp_path, nodes=2, **{"strategy.name": "udec", "train.scope": "shared", "train.rounds": 1})
    saved = load_node_model(run.state_dir(run.node_ids[0]))
    assert saved is not None
    for key, value in saved["model"].items():  # type: ignore[union-attr]
        same = torch.equal(value, torch.from_numpy(initial[key].numpy()))
        assert same == (part_of(key) != "decoder"), key


def test_private_parts_survive_the_server_resending_the_whole_model(tmp_path: Path) -> None:
    """After a lost reply the server sends the whole model again; the node keeps its own parts."""
    run, initial, _ = run_inprocess(tmp_path, nodes=2, **{"strategy.name": "ulatdec", "train.rounds": 1})
    node = run.node_ids[0]
    directory = run.state_dir(node)
    before = load_node_model(directory)
    assert before is not None
    resend = Message(RecordDict({"arrays": initial, "config": ConfigRecord({"server-round": 2})}),
                     message_type=MessageType.TRAIN, dst_node_id=node)
    run.cfg = run.cfg.model_copy(update={"train": run.cfg.train.model_copy(update={"lr": 1e-12, "rounds": 2})})
    run.respond(resend)
    after = load_node_model(directory)
    assert after is not None
    for key, value in after["model"].items():  # type: ignore[union-attr]
        if part_of(key) == "encoder" and value.ndim > 1:
            # lr ~ 0: the encoder is the node's own trained one, not the server's initialization
            assert torch.allclose(value, before["model"][key], atol=1e-6)  # type: ignore[index]
            assert not torch.equal(value, torch.from_numpy(initial[key].numpy()))
