"""Client failures and missing nodes: the round goes on with the survivors; a wait always ends."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from fedapp.config import parse_config
from fedapp.deploy.simulation import flwr_home, flwr_run
from fedapp.runs.checkpoint import load_checkpoint
from fedapp.runs.rundir import read_jsonl
from server_app.rounds import NodesMissingError, wait_for_nodes
from tests.support.markers import needs_fmnist
from tests.support.mocks import FakeGrid


def test_fault_config_names_partition_and_round() -> None:
    faults = parse_config({"faults.crash": "1@2, 0@3", "faults.hang": "2@1"}).faults
    assert faults.crash == "1@2,0@3"
    assert faults.crashes(1, 2) and faults.crashes(0, 3) and not faults.crashes(1, 3) and not faults.crashes(0, 2)
    assert faults.hangs(2, 1) and not faults.hangs(1, 2)
    for bad in ("1", "1@0", "a@2", "-1@2"):
        with pytest.raises(ValueError, match="PARTITION@ROUND"):
            parse_config({"faults.crash": bad})


def test_waiting_for_nodes_ends_with_a_reason() -> None:
    grid = FakeGrid([1, 2], respond=lambda m: m)
    started = time.monotonic()
    with pytest.raises(NodesMissingError, match=r"round 3: 2 of the 3 SuperNodes .* within "
                                                 r"strategy.node-timeout = 0.3 s"):
        wait_for_nodes(grid, 3, timeout=0.3, server_round=3, poll=0.05)
    assert time.monotonic() - started < 5
    assert wait_for_nodes(grid, 2, timeout=0.3, server_round=1) == 2


class LateGrid(FakeGrid):
    """A third node connects after a few polls."""

    def __init__(self) -> None:
        super().__init__([1, 2], respond=lambda m: m)
        self.polls = 0

    def get_node_ids(self) -> list[int]:
        self.polls += 1
        return [1, 2, 3] if self.polls > 3 else [1, 2]


def test_waiting_for_nodes_returns_once_they_come() -> None:
    assert wait_for_nodes(LateGrid(), 3, timeout=10, server_round=1, poll=0.01) == 3


@pytest.mark.e2e
@needs_fmnist
def test_simulation_survives_a_crash_and_a_hang_and_never_waits_forever(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    config = {
        "model.dim": 8, "model.dim-mults": "1,2", "data.max-train-examples": 200, "train.rounds": 3,
        "train.batch-size": 16, "train.max-steps-per-round": 2, "eval.every": 0, "eval.max-val-examples": 16,
        "output.dir": str(runs), "output.name": "faults", "output.progress": False,
        "strategy.name": "udec", "train.node-state-dir": str(tmp_path / "nodes"),
        # partition 1 raises in round 1; partition 0 sleeps past the round timeout in round 2
        "faults.crash": "1@1", "faults.hang": "0@2", "faults.hang-seconds": 45.0, "strategy.round-timeout": 25.0,
    }
    with flwr_home(tmp_path) as env:
        done = flwr_run(env, config, 2, timeout=600)
        log = done.stdout + done.stderr
        run = runs / "faults"
        assert (run / "final.pt").is_file(), log[-4000:]
        waited = flwr_run(env, {**config, "output.name": "waits", "strategy.min-nodes": 3,
                                "strategy.node-timeout": 3.0, "faults.crash": "", "faults.hang": ""}, 2, timeout=300)
    assert "injected fault: partition 1 crashes in round 1" in log
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3]
    uploads = {r: {t["node_id"] for t in read_jsonl(run / "comm.jsonl")
                   if t["server_round"] == r and t["message_type"] == "train" and t["direction"] == "up"
                   and t["params"] > 0}  # a failed client's error reply carries no arrays
               for r in (1, 2, 3)}
    assert [len(uploads[r]) for r in (1, 2, 3)] == [1, 1, 2], uploads  # the survivors carried rounds 1 and 2
    assert uploads[1] != uploads[2]
    assert all(math.isfinite(r["train"]["train-loss"]) for r in rows)
    model, _, _ = load_checkpoint(run / "final.pt")
    assert all(torch.isfinite(p).all() for p in model.parameters())

    message = "round 1: 2 of the 3 SuperNodes strategy.min-nodes asks for connected within strategy.node-timeout = 3 s"
    assert message in waited.stdout + waited.stderr, (waited.stdout + waited.stderr)[-3000:]
    assert not (runs / "waits" / "final.pt").exists()
