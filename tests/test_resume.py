"""Checkpoint and resume through the real ServerApp ``main``: killed mid-run, continued, compared."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict

from fedapp.runs.checkpoint import load_checkpoint
from fedapp.runs.node_state import OPTIMIZER, RESIDUAL, load_node_model, load_node_round
from fedapp.runs.rundir import read_jsonl
from server_app.app import main as server_main
from tests.support.inprocess import RUN_ID, InProcessRun, tiny_config
from tests.support.mocks import FakeGrid

NODES = [101, 108, 115]
pytestmark = pytest.mark.usefixtures("task_identity")  # Messages are built outside a Flower run
FAST = {"train.rounds": 4, "eval.every": 0, "data.max-train-examples": 90, "output.name": "run"}


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the server may catch it."""


def serve(base: Path, overrides: dict[str, Any], *, run_id: int = RUN_ID,
          kill_after_train: int = 0) -> InProcessRun:
    """One ServerApp run over in-process clients; ``kill_after_train``: die once that round's clients trained."""
    cfg = tiny_config(base, **{**FAST, **overrides})
    clients = InProcessRun(cfg, NODES, run_id=run_id)

    def respond(msg: Message) -> Message:
        reply = clients.respond(msg)
        trained = [m for m in clients.sent if m.metadata.message_type.startswith(MessageType.TRAIN)
                   and int(m.content["config"]["server-round"]) == kill_after_train]
        if kill_after_train and len(trained) == len(NODES):
            raise Killed  # the clients saved their round's models; the server never aggregates them
        return reply

    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.flat())
    server_main(FakeGrid(NODES, respond), context)
    return clients


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


FOUR_BIT_DELTA = {"transport.dtype": "int4", "transport.payload": "delta", "transport.error-feedback": True}


@pytest.mark.parametrize(("method", "transport"), [("usplit", {}), ("udec", {}), ("collafuse", {}),
                                                   ("udec", FOUR_BIT_DELTA)], ids=["usplit", "udec", "collafuse",
                                                                                   "udec-int4-delta"])
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path: Path, method: str,
                                                          transport: dict[str, object]) -> None:
    overrides = {"strategy.name": method, "collafuse.cut-ratio": 0.5, "collafuse.audit-samples": 0, **transport}
    whole = serve(tmp_path / "whole", overrides)
    run = tmp_path / "cut" / "runs" / "run"
    with pytest.raises(Killed):
        serve(tmp_path / "cut", overrides, kill_after_train=3)
    assert [r["round"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    assert not (run / "final.pt").exists()
    # A kill between round 2's checkpoint and its log line: the checkpoint's rows put it back.
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text(lines[0])

    resumed = serve(tmp_path / "cut", {**overrides, "output.resume": str(run)}, run_id=RUN_ID + 1)

    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    comm = read_jsonl(run / "comm.jsonl")
    baseline = read_jsonl(tmp_path / "whole" / "runs" / "run" / "comm.jsonl")
    key = ("server_round", "direction", "message_type")
    assert sorted(tuple(t[k] for k in key) for t in comm) == sorted(tuple(t[k] for k in key) for t in baseline)
    assert [r["round"] for r in read_jsonl(run / "metrics.jsonl")] == [r["round"] for r in rows]

    got, _, payload = load_checkpoint(run / "final.pt")
    want, _, _ = load_checkpoint(tmp_path / "whole" / "runs" / "run" / "final.pt")
    assert all(torch.isfinite(v).all() for v in got.state_dict().values())
    diff = max(float((a - b).abs().max()) for a, b in zip(got.state_dict().values(), want.state_dict().values()))
    assert diff == 0.0, f"resumed and uninterrupted final models differ by {diff:.3g}"
    assert [r["round"] for r in payload["extra"]["metrics"]] == [1, 2, 3, 4]
    if method in ("usplit", "collafuse"):  # the server's EMA (of the global model, of CollaFuse's) came through
        trained, _, _ = load_checkpoint(run / "final.pt", sampling=False)
        assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), got.state_dict().values()))
        theirs_ema = load_checkpoint(tmp_path / "whole" / "runs" / "run" / "final.pt")[2]["ema"]
        assert payload["ema"]["steps"] == theirs_ema["steps"] > 0
    # The resumed run's clients found the first run's state (another run id) and trained it on:
    # their Adam moments and step counts, their models and those models' EMAs.
    for node in NODES:
        mine_adam = load_node_round(resumed.state_dir(node, run_id=RUN_ID), OPTIMIZER)
        theirs_adam = load_node_round(whole.state_dir(node), OPTIMIZER)
        assert mine_adam is not None and theirs_adam is not None and mine_adam["round"] == 4
        ours, reference = mine_adam["optimizer"], theirs_adam["optimizer"]  # type: ignore[index]
        assert ours["steps"] == reference["steps"] > 0  # type: ignore[index]
        assert all(torch.equal(m["exp_avg_sq"], reference["moments"][k]["exp_avg_sq"])  # type: ignore[index]
                   for k, m in ours["moments"].items())  # type: ignore[index]
        mine = load_node_model(resumed.state_dir(node, run_id=RUN_ID))
        theirs = load_node_model(whole.state_dir(node))
        if method == "usplit":
            assert mine is None and theirs is None  # USplit keeps no model on the nodes
            continue
        assert mine is not None and theirs is not None and mine["round"] == 4
        assert all(torch.equal(mine["model"][k], theirs["model"][k]) for k in theirs["model"])  # type: ignore[index]
        ema, reference_ema = mine["ema"], theirs["ema"]  # type: ignore[index]
        assert ema["steps"] == reference_ema["steps"] > 0  # type: ignore[index]
        assert all(torch.equal(v, reference_ema["weights"][k]) for k, v in ema["weights"].items())  # type: ignore[index]
    if transport:  # the error feedback each node carries came through too, from its disk
        for node in NODES:
            mine_residual = load_node_round(resumed.state_dir(node, run_id=RUN_ID), RESIDUAL)
            theirs_residual = load_node_round(whole.state_dir(node), RESIDUAL)
            assert mine_residual is not None and theirs_residual is not None and mine_residual["round"] == 4
            assert all(torch.equal(v, theirs_residual["arrays"][k])  # type: ignore[index]
                       for k, v in mine_residual["arrays"].items())  # type: ignore[union-attr]
    if method == "usplit":  # the task generator resumed too: rounds 3 and 4 drew the same tasks
        def tasks(clients: InProcessRun, rounds: set[int]) -> list[tuple[int, int, str]]:
            return [(int(m.content["config"]["server-round"]), m.metadata.dst_node_id,
                     str(m.content["config"]["report-parts"])) for m in clients.sent
                    if m.metadata.message_type == MessageType.TRAIN
                    and int(m.content["config"]["server-round"]) in rounds]
        assert sorted(tasks(resumed, {3, 4})) == sorted(tasks(whole, {3, 4}))


def test_resume_refuses_a_different_model_and_an_unreadable_checkpoint(tmp_path: Path) -> None:
    serve(tmp_path, {"train.rounds": 2})
    run = tmp_path / "runs" / "run"
    before = digests(run)
    with pytest.raises(SystemExit, match=r"cannot resume run: model.dim = 16, but the run was trained with 8"):
        serve(tmp_path, {"train.rounds": 3, "model.dim": 16, "output.resume": str(run)})
    with pytest.raises(SystemExit, match="nothing to resume: run has finished round 2 of train.rounds = 2"):
        serve(tmp_path, {"train.rounds": 2, "output.resume": str(run)})
    assert digests(run) == before
    (run / "checkpoints" / "round-002.pt").write_bytes(b"not a checkpoint")
    before = digests(run)
    with pytest.raises(SystemExit, match=r"cannot resume: .*round-002.pt is not a readable fedapp checkpoint"):
        serve(tmp_path, {"train.rounds": 3, "output.resume": str(run)})
    assert digests(run) == before, "a refused resume must not touch the run"


def test_a_finished_run_trains_on_when_rounds_are_raised(tmp_path: Path) -> None:
    serve(tmp_path, {"train.rounds": 2})
    run = tmp_path / "runs" / "run"
    serve(tmp_path, {"train.rounds": 3, "output.resume": str(run)})
    assert [r["round"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
    assert load_checkpoint(run / "final.pt")[2]["round"] == 3
    assert "rounds = 3" in (run / "config.toml").read_text()
