"""End to end: ``flwr run`` of a tiny config on real Fashion-MNIST, then its run directory."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from fedapp.config import parse_config
from fedapp.deploy.simulation import flwr_home, flwr_run
from fedapp.model.unet import part_sizes, unet_parts
from fedapp.protocol.methods import private_parts, round_cost, shared_keys
from fedapp.protocol.quantize import payload_bytes
from fedapp.runs.checkpoint import load_checkpoint
from fedapp.runs.node_state import RESIDUAL
from fedapp.runs.rundir import read_jsonl
from tests.support.markers import needs_fmnist

pytestmark = [
    pytest.mark.e2e,
    needs_fmnist,
]

TINY = {
    "model.dim": 8,
    "model.dim-mults": "1,2",
    "data.max-train-examples": 300,
    "train.rounds": 2,
    "train.batch-size": 32,
    "eval.every": 1,
    "eval.num-samples": 4,
    "eval.sampler-steps": 4,
    "eval.max-val-examples": 32,
    "eval.metric-samples": 16,
    "eval.fid": "off",
    "eval.max-reference-examples": 500,
    "output.name": "e2e",
    "output.progress": False,
}


def test_flwr_run_leaves_a_complete_run_directory(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    with flwr_home(tmp_path) as env:
        bad = flwr_run(env, {**TINY, "output.dir": str(runs), "train.lr": -1.0}, 2, timeout=300)
        assert "train.lr" in bad.stdout + bad.stderr, bad.stdout[-3000:]
        assert not runs.exists(), "an invalid config must stop the run before anything is written"

        done = flwr_run(env, {**TINY, "output.dir": str(runs), "eval.stats-dir": str(tmp_path / "stats")}, 2,
                        timeout=600)
    log = done.stdout + done.stderr
    run = runs / "e2e"
    assert run.is_dir(), log[-4000:]
    assert f"fedapp run directory: {run}" in log

    cfg = parse_config(tomllib.loads((run / "config.toml").read_text()))
    assert cfg.model.dim == 8 and cfg.train.rounds == 2

    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert math.isfinite(row["train"]["train-loss"]) and row["train"]["train-loss"] > 0
        assert math.isfinite(row["evaluate"]["eval-loss"])
        assert (run / row["checkpoint"]).is_file()
        assert (run / row["samples"]).stat().st_size > 0
        assert row["quality"]["fd-cnn"] > 0 and row["quality"]["samples"] == 16  # the server scored it

    model, ckpt_cfg, payload = load_checkpoint(run / "final.pt")
    assert payload["round"] == 2 and ckpt_cfg == cfg
    assert all(torch.isfinite(p).all() for p in model.parameters())
    n_params = sum(part_sizes(model).values())
    train_comm = rows[-1]["comm"]["train"]
    assert train_comm["round"]["down_params"] == 2 * n_params
    assert train_comm["round"]["up_params"] == 2 * n_params
    assert train_comm["cumulative"]["down_params"] == 4 * n_params
    assert (run / "label-distribution.png").stat().st_size > 0
    assert list((run / "tensorboard" / "server").glob("events.out.tfevents.*")), "no TensorBoard event files"
    assert len(read_jsonl(run / "comm.jsonl")) == 2 * 2 * 4  # rounds x clients x (train, evaluate) x (down, up)

    grid = tmp_path / "grid.png"
    out = subprocess.run(
        [sys.executable, "-m", "fedapp", "sample", str(run / "final.pt"), "--n", "4", "--steps", "4",
         "--out", str(grid)],
        capture_output=True, text=True, check=False,
    )
    assert out.returncode == 0, out.stderr
    assert grid.stat().st_size > 0


@pytest.fixture(scope="module")
def shared_flwr(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One SuperLink for the per-method runs; it is stopped by PID afterwards."""
    tmp = tmp_path_factory.mktemp("methods")
    with flwr_home(tmp) as env:
        yield tmp, env


@pytest.mark.parametrize("method", ["usplit", "ulatdec", "udec"])
def test_each_feddiffuse_method_runs_end_to_end(shared_flwr, method: str) -> None:  # type: ignore[no-untyped-def]
    tmp, env = shared_flwr
    runs = tmp / "runs"
    config = {**TINY, "strategy.name": method, "output.dir": str(runs), "output.name": method,
              "train.node-state-dir": str(tmp / "nodes"), "eval.stats-dir": str(tmp / "stats")}
    done = flwr_run(env, config, 2, timeout=600)
    run = runs / method
    assert (run / "final.pt").is_file(), (done.stdout + done.stderr)[-4000:]
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]

    model, cfg, payload = load_checkpoint(run / "final.pt")
    sizes = part_sizes(model)
    for row in rows:
        measured = row["comm"]["train"]["round"]
        expected = round_cost(method, sizes, 2, first_round=row["round"] == 1)
        assert (measured["down_params"], measured["up_params"]) == (expected.down, expected.up)

    private = set(private_parts(method))
    transfers = read_jsonl(run / "comm.jsonl")
    for t in transfers:
        if t["direction"] == "up" or t["server_round"] > 1:
            assert not private & set(t["parts"]), f"private parts travelled: {t}"

    clients = payload["extra"]["clients"]
    if private:
        assert sorted(clients) == [0, 1] and "evaluate" in rows[-1] and "eval-loss-std" in rows[-1]["evaluate"]
        quality = rows[-1]["quality"]  # each client scored its own model
        assert quality["clients"] == 2 and quality["fd-cnn"] > 0 and quality["fd-cnn-std"] >= 0
        _sample_client(run, 1, tmp / f"{method}-client1.png")
    else:
        assert clients == {} and rows[-1]["quality"]["fd-cnn"] > 0 and "fd-cnn-std" not in rows[-1]["quality"]


def test_centralized_baseline_then_the_report_over_every_run(shared_flwr) -> None:  # type: ignore[no-untyped-def]
    """The baseline is one setting of the same app; the report reads real run directories."""
    tmp, env = shared_flwr
    runs = tmp / "runs"
    config = {**TINY, "strategy.name": "centralized", "output.dir": str(runs), "output.name": "centralized",
              "eval.stats-dir": str(tmp / "stats")}
    done = flwr_run(env, config, 2, timeout=600)
    run = runs / "centralized"
    assert (run / "final.pt").is_file(), (done.stdout + done.stderr)[-4000:]
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2] and rows[-1]["comm"] == {}
    assert rows[-1]["quality"]["fd-cnn"] > 0 and "centralized baseline" in done.stdout + done.stderr

    out = tmp / "report"
    result = subprocess.run(
        [sys.executable, "-m", "fedapp", "report", *sorted(str(p) for p in runs.iterdir()), "--out", str(out)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    text = (out / "report.md").read_text()
    for path in runs.iterdir():
        assert path.name in text
    assert "centralized (baseline)" in text and "FD-CNN" in text and "42.53" in text
    for png in ("samples.png", "communication.png", "quality-fd-cnn.png"):
        assert (out / png).stat().st_size > 0


def test_four_bit_delta_updates_run_end_to_end(shared_flwr) -> None:  # type: ignore[no-untyped-def]
    """UDec with 4-bit deltas and error feedback through Flower: the first download costs no arrays,
    every upload is the analytic size, and the residuals stay on the nodes' disks."""
    tmp, env = shared_flwr
    runs, nodes = tmp / "runs", tmp / "nodes-int4"
    config = {**TINY, "strategy.name": "udec", "output.dir": str(runs), "output.name": "int4",
              "train.node-state-dir": str(nodes), "eval.stats-dir": str(tmp / "stats"),
              "transport.dtype": "int4", "transport.payload": "delta", "transport.error-feedback": True}
    done = flwr_run(env, config, 2, timeout=600)
    run = runs / "int4"
    assert (run / "final.pt").is_file(), (done.stdout + done.stderr)[-4000:]
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    model, cfg, payload = load_checkpoint(run / "final.pt", sampling=False)
    assert cfg.transport.dtype == "int4" and all(torch.isfinite(p).all() for p in model.parameters())
    state = model.state_dict()
    upload = sum(payload_bytes(tuple(state[k].shape), "int4", True) for k in shared_keys(cfg.strategy.name, unet_parts(model)))
    first, second = (r["comm"]["train"]["round"] for r in rows)
    assert first["down_bytes"] == 0 and first["up_bytes"] == second["up_bytes"] == 2 * upload
    assert payload["extra"]["transport"]["version"] >= 1
    residuals = sorted(nodes.rglob(f"{RESIDUAL}*.pt"))
    assert len(residuals) >= 2, f"no error-feedback residuals under {nodes}"
    assert rows[-1]["quality"]["clients"] == 2 and rows[-1]["quality"]["fd-cnn"] > 0


def test_client_level_privacy_runs_end_to_end_and_its_models_can_be_audited(shared_flwr) -> None:  # type: ignore[no-untyped-def]
    """UDec with each client's own noise at a target ε, and DP-SGD in its local training at another, through
    Flower: every round's ε of both is in metrics.jsonl and the summary line, the last ones spend the
    targets, and ``fedapp audit`` scores each client's model."""
    from fedapp.privacy.accounting import PrivacyAccount, client_level_release

    tmp, env = shared_flwr
    runs = tmp / "runs"
    config = {**TINY, "strategy.name": "udec", "output.dir": str(runs), "output.name": "private",
              "train.node-state-dir": str(tmp / "nodes-dp"), "eval.stats-dir": str(tmp / "stats"),
              "privacy.clip": 1.0, "privacy.target-epsilon": 8.0, "privacy.noise": "client",
              "privacy.sample-clip": 1.0, "privacy.sample-target-epsilon": 4.0}
    done = flwr_run(env, config, 2, timeout=600)
    run = runs / "private"
    assert (run / "final.pt").is_file(), (done.stdout + done.stderr)[-4000:]
    rows = read_jsonl(run / "metrics.jsonl")
    sigma, rate = client_level_release(parse_config(config))
    account = PrivacyAccount(1e-5)
    for row in rows:
        account.release(sigma, rate)
        assert row["train"]["dp-epsilon"] == pytest.approx(account.epsilon(), rel=1e-6)
        assert "update-norm" not in row["train"]  # a private client keeps its update's norm to itself
    assert 7.9 < rows[-1]["train"]["dp-epsilon"] <= 8.0
    assert "ε 8.00" in done.stdout + done.stderr
    sample_level = [row["train"]["dp-sgd-epsilon"] for row in rows]
    assert sample_level == sorted(sample_level) and 3.9 < sample_level[-1] <= 4.0  # each client's σ spends it
    assert re.search(r"DP-SGD ε (3\.9\d|4\.00) \(worst client\)", done.stdout + done.stderr)
    audit = subprocess.run([sys.executable, "-m", "fedapp", "audit", str(run), "--members", "16",
                            "--nonmembers", "16", "--draws", "2", "--device", "cpu"],
                           capture_output=True, text=True, timeout=300, env=env)
    assert audit.returncode == 0, audit.stderr[-2000:]
    result = json.loads((run / "final-audit.json").read_text())
    assert sorted(r["client"] for r in result["clients"]) == [0, 1]
    assert all(r["model"] == "own" and 0.0 <= r["auc"] <= 1.0 and r["members"] == 16 for r in result["clients"])


def test_collafuse_runs_end_to_end(shared_flwr) -> None:  # type: ignore[no-untyped-def]
    """Named actions through Flower, split inference, per-client grids, the report and the split CLI."""
    tmp, env = shared_flwr
    runs = tmp / "runs"
    config = {**TINY, "strategy.name": "collafuse", "collafuse.cut-ratio": 0.5, "output.dir": str(runs),
              "output.name": "collafuse", "train.node-state-dir": str(tmp / "nodes"),
              "eval.stats-dir": str(tmp / "stats")}
    done = flwr_run(env, config, 2, timeout=600)
    run = runs / "collafuse"
    assert (run / "final.pt").is_file(), (done.stdout + done.stderr)[-4000:]
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    last = rows[-1]
    assert last["train"]["audit-solve-mse"] < 1e-6 < last["train"]["audit-xt-mse"]
    assert "audit-denoise-ssim" in last["evaluate"] and "eval-loss-std" in last["evaluate"]
    assert last["quality"]["clients"] == 2 and last["quality"]["fd-cnn"] > 0
    report = last["collafuse"]
    assert report["t-c"] == 500 and sorted(report["clients"]) == ["0", "1"]
    assert 0 < report["client-share"]["train-samples"] < 1 and report["client-share"]["infer-steps"] == 0.5
    for pid in (0, 1):
        assert (run / "samples" / f"round-002-client-{pid}.png").stat().st_size > 0
    transfers = read_jsonl(run / "comm.jsonl")
    assert {t["message_type"] for t in transfers} == {"train.collafuse", "evaluate.collafuse"}
    assert all(t["parts"] in ([], ["other"]) for t in transfers), "a UNet weight travelled"

    _, _, payload = load_checkpoint(run / "final.pt")
    assert sorted(payload["extra"]["clients"]) == [0, 1] and payload["extra"]["strategy"]["optimizer"]["moments"]
    _sample_client(run, 0, tmp / "collafuse-client0.png")  # the server's model to t_c, client 0's after
    refused = subprocess.run([sys.executable, "-m", "fedapp", "sample", str(run / "final.pt")],
                             capture_output=True, text=True, check=False)
    assert refused.returncode != 0 and "--client" in refused.stderr


def _sample_client(run: Path, client: int, grid: Path) -> None:
    """``fedapp sample --client`` on a finished run writes a grid."""
    out = subprocess.run(
        [sys.executable, "-m", "fedapp", "sample", str(run / "final.pt"), "--client", str(client),
         "--n", "4", "--steps", "4", "--out", str(grid)],
        capture_output=True, text=True, check=False,
    )
    assert out.returncode == 0, out.stderr
    assert grid.stat().st_size > 0
