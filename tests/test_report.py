"""``fedapp report`` over synthetic run directories: no training, only what a run writes to disk."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import tomli_w
from PIL import Image

from fedapp.cli import main
from fedapp.report.markdown import comm_reduction, load_run, write_report


def _comm(down: int, up: int) -> dict[str, Any]:
    cum = {"down_params": down, "down_bytes": 4 * down, "up_params": up, "up_bytes": 4 * up}
    return {"train": {"round": cum, "cumulative": cum},
            "evaluate": {"round": {}, "cumulative": {**cum, "up_params": 0, "up_bytes": 0}},
            "per_client": {"11": {}, "22": {}}}


def _grid(path: Path, shade: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (16, 16), shade).save(path)
    return "samples/round-002.png"


def make_run(root: Path, name: str, method: str, partitioner: str, rows: list[dict[str, Any]],
             labels: bool = False) -> Path:
    run = root / name
    run.mkdir(parents=True)
    config = {"strategy": {"name": method}, "train": {"rounds": 2, "local-epochs": 1},
              "data": {"name": "fashion-mnist", "partitioner": partitioner, "num-partitions": 0},
              "eval": {"sampler": "ddim", "sampler-steps": 50}}
    (run / "config.toml").write_text(tomli_w.dumps(config))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if any("samples" in r for r in rows):
        _grid(run / "samples" / "round-002.png", 128)
    if labels:
        Image.new("RGB", (20, 10), (0, 0, 255)).save(run / "label-distribution.png")
    return run


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    """Full and UDec on IID with known traffic (UDec: 265k of Full's 1M params, 73.5 % less), and a baseline."""
    full = make_run(tmp_path / "runs", "full-iid", "full", "iid", [
        {"round": 1, "wall_s": 10.0, "comm": _comm(400_000, 100_000), "evaluate": {"eval-loss": 0.5}},
        {"round": 2, "wall_s": 20.0, "comm": _comm(500_000, 500_000), "evaluate": {"eval-loss": 0.4},
         "quality": {"fd-cnn": 30.0, "fid": 90.0, "samples": 256, "sampler": "ddim-50"},
         "samples": "samples/round-002.png"},
    ])
    udec = make_run(tmp_path / "runs", "udec-iid", "udec", "iid", [
        {"round": 1, "wall_s": 8.0, "comm": _comm(200_000, 15_000),
         "evaluate": {"eval-loss": 0.6, "eval-loss-std": 0.05}},
        {"round": 2, "wall_s": 16.0, "comm": _comm(240_000, 25_000),
         "evaluate": {"eval-loss": 0.45, "eval-loss-std": 0.04},
         "quality": {"fd-cnn": 40.0, "fd-cnn-std": 5.0, "samples": 128, "sampler": "ddim-50", "clients": 2.0},
         "samples": "samples/round-002.png"},
    ], labels=True)
    central = make_run(tmp_path / "runs", "central", "centralized", "iid", [
        {"round": 1, "wall_s": 5.0, "comm": {}, "evaluate": {"eval-loss": 0.3}},
        {"round": 2, "wall_s": 9.0, "comm": {}, "evaluate": {"eval-loss": 0.2},
         "quality": {"fd-cnn": 20.0, "samples": 256, "sampler": "ddim-50"}, "samples": "samples/round-002.png"},
    ])
    return [full, udec, central]


def _table_row(text: str, run_name: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| `{run_name}`") and "MB" in line)


def test_report_names_every_run_and_keeps_fd_cnn_apart_from_the_authors_fid(runs: list[Path],
                                                                             tmp_path: Path) -> None:
    text = write_report(runs, tmp_path / "out").read_text()
    for name in ("full-iid", "udec-iid", "central"):
        assert f"`{name}`" in text
    assert "FD-CNN" in text and "FID (Inception)" in text
    assert "centralized (baseline)" in text
    assert "42.53" in text and "authors" in text and "not comparable in absolute value with FD-CNN" in text
    results = text[text.index("## Results"):]
    first_row = next(line for line in results.splitlines() if line.startswith("| `"))
    assert "centralized (baseline)" in first_row
    assert "40.00 ± 5.00 (N=128, ddim-50, 2 client models, round 2)" in _table_row(text, "udec-iid")
    assert "90.00" in _table_row(text, "full-iid")


def test_every_linked_png_exists_and_is_not_empty(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    text = write_report(runs, out).read_text()
    links = re.findall(r"\]\(([^)]+\.png)\)", text)
    for name in ("quality-fd-cnn.png", "quality-fid.png", "quality-eval-loss.png", "communication.png",
                 "samples.png", "labels-udec-iid.png"):
        assert name in links
    assert sum("round-002.png" in link for link in links) == 3  # each original grid is linked
    for link in links:
        target = out / unquote(link)
        assert target.is_file() and target.stat().st_size > 0, link
    assert not (out / "labels-full-iid.png").exists()


def test_udec_reduction_against_the_full_run_with_the_same_partitioner(runs: list[Path],
                                                                       tmp_path: Path) -> None:
    full, udec = load_run(runs[0]), load_run(runs[1])
    assert comm_reduction(udec, full) == (pytest.approx(0.735), 2)
    text = write_report(runs, tmp_path / "out").read_text()
    row = _table_row(text, "udec-iid")
    assert "| 73.5 % |" in row and "0.265 M" in row and "1.06 MB" in row
    assert "0 % (reference)" in _table_row(text, "full-iid")


def test_a_run_without_quality_rows_is_listed_with_a_dash_and_a_note(runs: list[Path], tmp_path: Path) -> None:
    bare = make_run(tmp_path / "runs", "usplit-skew", "usplit", "label-skew",
                    [{"round": 1, "wall_s": 3.0, "comm": _comm(10, 10)}])
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    text = write_report([*runs, bare], out).read_text()
    row = _table_row(text, "usplit-skew")
    assert row.count("—") >= 4
    assert "`usplit-skew`: no evaluation round with quality metrics yet" in text
    assert "`usplit-skew`: no full run with partitioner label-skew" in text
    assert (out / "mine.txt").read_text() == "keep me"


def test_cli_writes_the_report_and_prints_its_path(runs: list[Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli-out"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.md")
    assert (out / "report.md").is_file()


def test_bad_inputs_give_a_one_line_error_naming_the_path(runs: list[Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    not_a_run = tmp_path / "just-a-folder"
    not_a_run.mkdir()
    broken = make_run(tmp_path / "runs", "broken", "full", "iid", [{"round": 1}])
    with (broken / "metrics.jsonl").open("a") as handle:
        handle.write('{"round": 2, "wall_s"\n')
    for bad, expected in ((not_a_run, "is not a run directory"), (tmp_path / "missing", "no such run"),
                          (broken, "metrics.jsonl:2: unreadable metrics line")):
        assert main(["report", str(runs[0]), str(bad), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("fedapp report: ")
        assert str(bad) in err and expected in err
    assert not (tmp_path / "out").exists()  # nothing written when an input is bad
