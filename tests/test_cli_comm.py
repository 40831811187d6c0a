"""``fedapp comm --check``: a run's measured training traffic against the analytic count."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedapp.cli import main
from fedapp.config import parse_config
from fedapp.model.build import build_model
from fedapp.model.unet import part_sizes
from fedapp.protocol.methods import round_cost
from fedapp.runs.rundir import RunDir


def fake_run(tmp_path: Path, name: str, method: str, extra_up: int = 0) -> Path:
    """A 2-round, 3-client run directory whose ledger holds the analytic counts (plus ``extra_up``)."""
    cfg = parse_config({"model.dim": 8, "model.dim-mults": "1,2", "strategy.name": method,
                        "output.dir": str(tmp_path), "output.name": name})
    run = RunDir.create(cfg)
    sizes = part_sizes(build_model(cfg))
    down = up = 0
    for rnd in (1, 2):
        cost = round_cost(method, sizes, 3, first_round=rnd == 1)
        per_down, per_up = int(cost.down) // 3, int(cost.up) // 3
        run.append_jsonl(run.comm_path, [
            {"server_round": rnd, "node_id": node, "direction": d, "message_type": "train", "params": p}
            for node in (1, 2, 3) for d, p in (("down", per_down), ("up", per_up))
        ])
        down, up = down + 3 * per_down, up + 3 * per_up
        cumulative = {"down_params": down, "up_params": up + (extra_up if rnd == 2 else 0)}
        run.append_jsonl(run.metrics_path, {"round": rnd, "comm": {"train": {"cumulative": cumulative}}})
    return run.path


def test_matching_runs_pass_and_a_mismatch_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = [fake_run(tmp_path, m, m) for m in ("full", "ulatdec", "udec")]
    assert main(["comm", "--check", *map(str, good)]) == 0
    out = capsys.readouterr().out
    assert out.count(" yes") == 3 and "udec" in out

    bad = fake_run(tmp_path, "bad", "udec", extra_up=5)
    assert main(["comm", "--check", str(bad)]) == 1
    assert "NO" in capsys.readouterr().out


def test_a_folder_that_is_not_a_run_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["comm", "--check", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedapp comm:") and "not a finished run directory" in err and "\n" not in err


def test_a_collafuse_run_is_named_as_outside_the_analytic_count(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    run = fake_run(tmp_path, "cf", "full")
    (run / "config.toml").write_text((run / "config.toml").read_text().replace('"full"', '"collafuse"'))
    assert main(["comm", "--check", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "a collafuse run; the analytic count covers full, usplit, ulatdec, udec" in err and "\n" not in err
