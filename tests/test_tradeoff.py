"""The cut-ratio sweep's table and plot, read back from run directories."""

from __future__ import annotations

from pathlib import Path

import pytest
from matplotlib.figure import Figure

from fedapp.config import parse_config
from fedapp.report.tradeoff import by_cut, sweep_row, write_tradeoff
from fedapp.runs.rundir import RunDir


def _run(tmp_path: Path, c: float, fd: float | None, ssim: float | None, name: str = "", seed: int = 0) -> Path:
    cfg = parse_config({"strategy.name": "collafuse", "collafuse.cut-ratio": c, "output.dir": str(tmp_path),
                        "output.name": name or f"cut-{c}", "seed": seed})
    run = RunDir.create(cfg)
    audit = {} if ssim is None else {"audit-xt-ssim": ssim, "audit-xt-mse": 1.0, "audit-solve-mse": 1e-12}
    counters = {"train-client-samples": 100 * c, "train-server-samples": 100 * (1 - c),
                "train-client-seconds": 3.0 * c, "train-server-seconds": 1.0 * (1 - c),
                "infer-client-steps": 50 * c, "infer-server-steps": 50 * (1 - c)}
    for r in (1, 2):
        row = {"round": r, "train": dict(audit), "evaluate": {},
               "comm": {"train.collafuse": {"round": {"up_wire": 2_000_000 * (1 - c)}}},
               "collafuse": {"clients": {"0": counters, "1": counters}}}
        if r == 2 and fd is not None:
            row["quality"] = {"fd-cnn": fd, "fd-cnn-std": 2.0, "clients": 2.0}
        run.append_jsonl(run.metrics_path, row)
    return run.path


def test_the_sweep_table_sorts_by_cut_and_sums_every_round(tmp_path: Path) -> None:
    runs = [_run(tmp_path, 1.0, 300.0, None), _run(tmp_path, 0.0, 100.0, 0.02), _run(tmp_path, 0.5, 200.0, 0.05)]
    row = sweep_row(runs[2])
    assert row["t-c"] == 500 and row["fd-cnn"] == 200.0 and row["up-mb"] == pytest.approx(2.0)
    assert row["train-samples"] == pytest.approx(0.5) and row["train-seconds"] == pytest.approx(0.75)
    assert row["infer-seconds"] is None  # not recorded: no share is made up
    assert sweep_row(runs[0])["audit-xt-ssim"] is None  # c = 1: the server received nothing to audit
    out = write_tradeoff(runs, tmp_path / "out")
    lines = [line for line in out.read_text().splitlines() if line.startswith("| ")]
    assert "client share, train samples" in lines[0]
    assert [line.split("|")[1].strip() for line in lines[1:]] == ["0", "0.5", "1"]
    assert "100.0 ± 2.0" in lines[1] and "–" in lines[3]
    assert (tmp_path / "out" / "tradeoff.png").stat().st_size > 0


def test_seeds_of_one_cut_are_rows_of_their_own_and_a_run_not_scored_yet_has_no_fd_cnn(tmp_path: Path) -> None:
    runs = [_run(tmp_path, 0.2, 300.0, 0.05, "c0.2-s1", seed=1), _run(tmp_path, 0.2, 100.0, 0.05, "c0.2-s0"),
            _run(tmp_path, 0.0, None, 0.2, "c0-s1", seed=1)]
    out = write_tradeoff(runs, tmp_path / "out")
    lines = [line.split("|") for line in out.read_text().splitlines() if line.startswith("| ")][1:]
    assert [(cells[1].strip(), cells[2].strip(), cells[4].strip()) for cells in lines] == [
        ("0", "1", "–"), ("0.2", "0", "100.0 ± 2.0"), ("0.2", "1", "300.0 ± 2.0")]
    rows = [sweep_row(r) for r in runs]
    assert by_cut(rows, "fd-cnn") == ([0.2], [200.0])  # the line joins the means over seeds
    assert by_cut(rows, "audit-xt-ssim") == ([0.0, 0.2], [0.2, pytest.approx(0.05)])
    assert (tmp_path / "out" / "tradeoff.png").stat().st_size > 0


def test_a_run_of_another_method_is_refused(tmp_path: Path) -> None:
    cfg = parse_config({"strategy.name": "udec", "output.dir": str(tmp_path), "output.name": "udec"})
    run = RunDir.create(cfg)
    with pytest.raises(ValueError, match="no metrics.jsonl"):  # read as the report reads runs
        sweep_row(run.path)
    run.append_jsonl(run.metrics_path, {"round": 1, "train": {}, "evaluate": {}, "comm": {}})
    with pytest.raises(ValueError, match="udec run, not a CollaFuse one"):
        sweep_row(run.path)


def test_the_plot_draws_the_clients_shares_against_the_line_share_equals_c(tmp_path: Path,
                                                                            drawn: dict[str, Figure]) -> None:
    runs = [_run(tmp_path, 0.0, 100.0, 0.2), _run(tmp_path, 0.5, 200.0, 0.05)]
    write_tradeoff(runs, tmp_path / "out")
    shares = {line.get_label(): line.get_xydata().tolist() for line in drawn["tradeoff.png"].axes[2].get_lines()}
    assert shares["client share = c"] == [[0.0, 0.0], [1.0, 1.0]]
    assert shares["client share of training samples"] == [[0.0, 0.0], [0.5, 0.5]]
    assert shares["client share of training time"] == [[0.0, 0.0], [0.5, 0.75]]  # 3 s a client sample, 1 a server one
    assert shares["client share of sampling steps"] == [[0.0, 0.0], [0.5, 0.5]]
