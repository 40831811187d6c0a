"""A hostile node in a real ``flwr run``: the run finishes every round, the model stays finite, each drop is named.

The app under test is this project with one change, its ClientApp: ``tests/hostile_app``
wraps the real one and, on partition 0, breaks the train reply differently each round
(NaN and Inf num-examples, bytes of another shape than the metadata says, NaN weights).
Partition 1 is honest, so every round still has one valid reply to average.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from fedapp.deploy.simulation import REPO, flwr_home, flwr_run
from fedapp.runs.checkpoint import load_checkpoint
from fedapp.runs.rundir import read_jsonl
from tests.support.markers import needs_fmnist
from tests.test_e2e import TINY

pytestmark = [pytest.mark.e2e, needs_fmnist]
HOSTILE = Path(__file__).parent / "hostile_app" / "hostile_client.py"
REASONS = {  # round -> what the server's log must say about partition 0's reply
    1: r"expected one MetricRecord with an integer 'num-examples' .* got nan",
    2: r"bytes hold float32 \(2, \d+\) but the metadata says float32 \(\d+,\)",
    3: r"expected one MetricRecord with an integer 'num-examples' .* got inf",
    4: r"holds NaN or Inf",
}


def hostile_app(folder: Path) -> Path:
    """This project's pyproject.toml with the hostile ClientApp; the packages come from the install."""
    folder.mkdir(parents=True)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'clientapp = "client_app.app:app"' in pyproject
    (folder / "pyproject.toml").write_text(pyproject.replace('clientapp = "client_app.app:app"',
                                                             'clientapp = "hostile_client:app"'))
    shutil.copy(HOSTILE, folder / HOSTILE.name)
    return folder


def test_a_hostile_node_cannot_end_or_poison_the_run(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    config = {**TINY, "train.rounds": 4, "eval.every": 4, "output.name": "hostile", "output.dir": str(runs),
              "eval.stats-dir": str(tmp_path / "stats"), "strategy.name": "full"}
    with flwr_home(tmp_path) as env:
        done = flwr_run(env, config, 2, timeout=900, app=hostile_app(tmp_path / "app"))
    log = done.stdout + done.stderr
    run = runs / "hostile"
    assert [row["round"] for row in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4], log[-4000:]
    drops = re.findall(r"dropping reply from node (\d+): (.*)", log)
    assert len(drops) == 4 and len({node for node, _ in drops}) == 1, drops
    for (_, reason), (rnd, expected) in zip(drops, sorted(REASONS.items())):
        assert re.search(expected, reason), f"round {rnd}: {reason}"
    model, _, _ = load_checkpoint(run / "final.pt")
    assert all(torch.isfinite(p).all() for p in model.state_dict().values())
    for row in read_jsonl(run / "metrics.jsonl"):
        assert row["train"]["train-loss"] > 0, row
