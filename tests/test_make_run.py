"""The README's main command, as a new user types it: ``make run`` with a PATH that lacks the venv.

``flwr run`` starts the local SuperLink as ``flower-superlink``, looked up on PATH; the
Makefile must put its venv there itself. The SuperLink gets ports of the test's own, so an
already running one (another checkout's, or another test's) cannot make this pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedapp.deploy.processes import stop_pids, superlink_pids
from fedapp.deploy.simulation import REPO, simulation_env
from fedapp.runs.rundir import read_jsonl
from tests.support.markers import needs_fmnist

pytestmark = [pytest.mark.e2e, needs_fmnist]

TINY_RUN_CONFIG = (
    'model.dim=8 model.dim-mults="1,2" data.max-train-examples=200 train.rounds=1 train.batch-size=32 '
    'eval.every=1 eval.num-samples=4 eval.sampler-steps=4 eval.max-val-examples=32 eval.metric-samples=16 '
    'eval.fid="off" eval.max-reference-examples=200 output.name="make-run" output.progress=false'
)


def test_make_run_works_without_the_venv_on_path(tmp_path: Path) -> None:
    venv_bin = Path(sys.executable).parent
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                           if p and Path(p).resolve() != venv_bin.resolve())
    home = tmp_path / "flwr-home"
    env = {**simulation_env(home), "PATH": path}  # ports of its own; the venv is not on PATH
    env.pop("VIRTUAL_ENV", None)
    runs = tmp_path / "runs"
    try:
        done = subprocess.run(
            ["make", "-C", str(REPO), "run", f"VENV={venv_bin.parent}", "CLIENTS=2",
             f'RUN_CONFIG={TINY_RUN_CONFIG} output.dir="{runs}" eval.stats-dir="{tmp_path / "stats"}"'],
            env=env, capture_output=True, text=True, timeout=600, check=False)
    finally:
        stop_pids(superlink_pids(home))
    log = done.stdout + done.stderr
    assert "No such file or directory: 'flower-superlink'" not in log, log[-3000:]
    assert done.returncode == 0, log[-3000:]
    assert (runs / "make-run" / "final.pt").is_file(), log[-3000:]
    assert [r["round"] for r in read_jsonl(runs / "make-run" / "metrics.jsonl")] == [1]
