"""The README's main command, as a new user types it: ``make run`` with a PATH that lacks the venv.

``flwr run`` starts the local SuperLink as ``flower-superlink``, looked up on PATH, and exits 0
whatever became of the run: ``make run`` (``fedapp run``) starts it from its venv, on ports of
its own (another checkout's SuperLink cannot make this pass), stops it, and reads the run directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedapp.deploy.processes import stop_pids, superlink_pids
from fedapp.deploy.simulation import REPO
from fedapp.runs.rundir import read_jsonl
from tests.support.markers import needs_fmnist

pytestmark = [pytest.mark.e2e, needs_fmnist]

TINY_RUN_CONFIG = (
    'model.dim=8 model.dim-mults="1,2" data.max-train-examples=200 train.batch-size=32 '
    'eval.every=1 eval.num-samples=4 eval.sampler-steps=4 eval.max-val-examples=32 eval.metric-samples=16 '
    'eval.fid="off" eval.max-reference-examples=200 output.name="make-run" output.progress=false'
)


def _make_run(tmp_path: Path, run_config: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """``make run`` with a PATH that lacks the venv; (the finished make, the Flower home it used)."""
    venv_bin = Path(sys.executable).parent
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                           if p and Path(p).resolve() != venv_bin.resolve())
    home = tmp_path / "flwr-home"
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": path}
    env.pop("VIRTUAL_ENV", None)
    try:
        done = subprocess.run(
            ["make", "-C", str(REPO), "run", f"VENV={venv_bin.parent}", "CLIENTS=2",
             f'RUN_CONFIG={TINY_RUN_CONFIG} {run_config} eval.stats-dir="{tmp_path / "stats"}"'],
            env=env, capture_output=True, text=True, timeout=600, check=False)
    finally:
        left = superlink_pids(home)
        stop_pids(left)
    assert not left, f"make run left its SuperLink running: pids {left}"
    return done, home


def test_make_run_works_without_the_venv_on_path_and_stops_its_superlink(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    done, _ = _make_run(tmp_path, f'output.dir="{runs}" train.rounds=1')
    log = done.stdout + done.stderr
    assert "No such file or directory: 'flower-superlink'" not in log, log[-3000:]
    assert done.returncode == 0, log[-3000:]
    assert f"fedapp: run finished: {runs / 'make-run'}" in log
    assert (runs / "make-run" / "final.pt").is_file(), log[-3000:]
    assert [r["round"] for r in read_jsonl(runs / "make-run" / "metrics.jsonl")] == [1]


def test_make_run_fails_when_the_run_does_not_finish(tmp_path: Path) -> None:
    """Every client crashes in round 2: flwr run still exits 0, make run must not."""
    runs = tmp_path / "runs"
    done, _ = _make_run(tmp_path, f'output.dir="{runs}" train.rounds=2 faults.crash="0@2,1@2"')
    log = done.stdout + done.stderr
    assert done.returncode != 0, log[-3000:]
    assert "fedapp: the run did not finish: make-run reached round 1 of 2; see the log above" in done.stderr, log[-3000:]
    assert [r["round"] for r in read_jsonl(runs / "make-run" / "metrics.jsonl")] == [1]
