"""The centralized baseline: the clients' data pooled, the same model, epochs and outputs."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fedapp.config import parse_config
from fedapp.data.share import local_data
from fedapp.runs.checkpoint import load_checkpoint
from fedapp.runs.rundir import RunDir, read_jsonl
from server_app.centralized import pooled_data, run_centralized
from tests.support.markers import needs_fmnist

pytestmark = needs_fmnist


def _cfg(tmp_path: Path, **extra: object):  # type: ignore[no-untyped-def]
    return parse_config({
        "strategy.name": "centralized", "model.dim": 8, "model.dim-mults": "1,2",
        "data.max-train-examples": 200, "data.partitioner": "label-skew", "train.rounds": 2,
        "train.local-epochs": 1,
        "train.batch-size": 32, "train.lr": 1e-3, "eval.every": 1, "eval.num-samples": 4,
        "eval.sampler-steps": 4, "eval.metric-samples": 16, "eval.fid": "off",
        "eval.max-reference-examples": 500, "eval.stats-dir": str(tmp_path / "stats"),
        "output.dir": str(tmp_path / "runs"), "output.name": "central", "output.progress": False,
        **extra,
    })


def test_the_pool_is_exactly_the_union_of_the_clients_parts(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    train, val = pooled_data(cfg, 3)
    parts = [local_data(cfg.data, cfg.seed, pid, 3) for pid in range(3)]
    assert torch.equal(train, torch.cat([p.train.images for p in parts]))
    assert torch.equal(val, torch.cat([p.val.images for p in parts]))
    assert len(train) + len(val) == 200


def test_centralized_run_writes_the_same_outputs_as_a_federation(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    run = RunDir.create(cfg)
    rows = run_centralized(cfg, run, 2)
    assert rows == read_jsonl(run.metrics_path)
    assert [r["round"] for r in rows] == [1, 2]
    train, _ = pooled_data(cfg, 2)
    for row in rows:
        assert row["train"]["train-steps"] == math.ceil(len(train) / 32)  # one epoch over the pool
        assert math.isfinite(row["evaluate"]["eval-loss"]) and row["comm"] == {}
        assert row["quality"]["samples"] == 16 and row["quality"]["sampler"] == "ddpm-4"
        assert math.isfinite(row["quality"]["fd-cnn"]) and row["quality"]["fd-cnn"] > 0
        assert (run.path / row["samples"]).stat().st_size > 0
        assert (run.path / row["checkpoint"]).is_file()
    assert rows[1]["train"]["train-loss"] < rows[0]["train"]["train-loss"]
    model, ckpt_cfg, payload = load_checkpoint(run.path / "final.pt")
    assert ckpt_cfg.strategy.name == "centralized" and payload["round"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the baseline may catch it."""


def test_a_killed_baseline_resumes_to_the_uninterrupted_result(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import server_app.centralized as centralized
    from fedapp.runs.resume import load_resume_point

    fast = {"train.rounds": 3, "eval.every": 0, "train.final-lr-ratio": 0.2, "train.warmup-steps": 3,
            "train.ema-decay": 0.995}
    whole_cfg = _cfg(tmp_path / "whole", **fast)
    whole = run_centralized(whole_cfg, RunDir.create(whole_cfg), 2)

    cut_cfg = _cfg(tmp_path / "cut", **fast)
    run = RunDir.create(cut_cfg)
    trained = centralized.train_local

    def dies_in_round_3(*args, **kwargs):  # type: ignore[no-untyped-def]
        if kwargs["desc"].endswith("round 3"):
            raise Killed
        return trained(*args, **kwargs)

    monkeypatch.setattr(centralized, "train_local", dies_in_round_3)
    try:
        run_centralized(cut_cfg, run, 2)
    except Killed:
        pass
    else:
        raise AssertionError("the baseline was not interrupted")
    assert [r["round"] for r in read_jsonl(run.metrics_path)] == [1, 2] and not (run.path / "final.pt").exists()
    monkeypatch.setattr(centralized, "train_local", trained)

    resumed_cfg = _cfg(tmp_path / "cut", **fast, **{"output.resume": str(run.path)})
    point = load_resume_point(resumed_cfg)
    rows = run_centralized(resumed_cfg, point.run, 2, point)

    assert [r["round"] for r in rows] == [r["round"] for r in read_jsonl(run.metrics_path)] == [1, 2, 3]
    assert [r["train"]["train-loss"] for r in rows] == [r["train"]["train-loss"] for r in whole]
    for sampling in (True, False):  # the EMA and the trained weights (Adam's state came back too)
        got = load_checkpoint(run.path / "final.pt", sampling=sampling)[0].state_dict()
        want = load_checkpoint(tmp_path / "whole" / "runs" / "central" / "final.pt", sampling=sampling)[0].state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)
