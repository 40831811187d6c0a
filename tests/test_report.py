"""``fedapp report`` over synthetic run directories: no training, only what a run writes to disk."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import matplotlib.pyplot as plt
import numpy as np
import pytest
import tomli_w
from PIL import Image

from fedapp.cli import main
from fedapp.report.htmlpage import write_html
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
             labels: bool = False, seed: int = 0) -> Path:
    run = root / name
    run.mkdir(parents=True)
    config = {"seed": seed, "strategy": {"name": method}, "train": {"rounds": 2, "local-epochs": 1},
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


def test_collafuses_named_actions_count_as_its_traffic_with_no_reduction_against_full(
        runs: list[Path], tmp_path: Path) -> None:
    up = {"down_params": 0, "down_bytes": 0, "up_params": 3_000_000, "up_bytes": 12_000_000}
    down = {"down_params": 200_000, "down_bytes": 800_000, "up_params": 0, "up_bytes": 0}
    cf = make_run(tmp_path / "runs", "cf-iid", "collafuse", "iid", [
        {"round": 1, "wall_s": 5.0, "comm": {"train.collafuse": {"round": up, "cumulative": up},
                                             "evaluate.collafuse": {"round": down, "cumulative": down}}}])
    text = write_report([*runs, cf], tmp_path / "out").read_text()
    row = _table_row(text, "cf-iid")
    assert "| 3.000 M | 12.00 MB | — | 0.80 MB |" in row  # training up, its reduction, evaluation down
    assert "`cf-iid`: CollaFuse's traffic is the values of x_t, ε and t" in text
    assert "`cf-iid`" not in text.split("Not shown")[1].split("\n")[0]


def test_a_study_of_many_runs_draws_each_in_a_style_of_its_own_and_collafuse_with_its_cut(
        tmp_path: Path, drawn: dict[str, plt.Figure]) -> None:
    root = tmp_path / "runs"
    runs = [make_run(root, f"full{i}", "full", "iid", [{"round": 1, "comm": _comm(10, 10)}], seed=i)
            for i in range(11)]
    cf = make_run(root, "cf", "collafuse", "iid", [{"round": 1, "comm": _comm(10, 10)}])
    config = tomllib.loads((cf / "config.toml").read_text())
    (cf / "config.toml").write_text(tomli_w.dumps({**config, "collafuse": {"cut-ratio": 0.2}}))
    write_report([*runs, cf], tmp_path / "out")
    (ax,) = drawn["communication.png"].axes
    styles = [(line.get_color(), line.get_linestyle()) for line in ax.get_lines()]
    assert len(styles) == 12 and len(set(styles)) == 12  # matplotlib's ten colours, then dashed
    assert ax.get_lines()[-1].get_label() == "collafuse · iid · c = 0.2"


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


def _scored(fd: float, samples: int = 1000, clients: tuple[float, ...] = (), precision: float = 0.8,
            recall: float = 0.5) -> dict[str, Any]:
    quality: dict[str, Any] = {"fd-cnn": fd, "samples": samples, "fd-cnn-precision": precision,
                               "fd-cnn-recall": recall}
    row: dict[str, Any] = {"round": 2, "wall_s": 9.0, "quality": quality}
    if clients:
        row["per_client"] = {str(i): {"evaluate": {"fd-cnn": v}} for i, v in enumerate(clients)}
    return row


def test_ratio_to_centralized_pairs_each_run_with_the_baseline_of_its_seed(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    runs = [make_run(root, "c0", "centralized", "iid", [_scored(50.0, precision=0.9, recall=0.7)], seed=0),
            make_run(root, "c1", "centralized", "iid", [_scored(40.0)], seed=1),
            make_run(root, "udec0", "udec", "iid", [_scored(150.0, clients=(100.0, 200.0), precision=0.82,
                                                            recall=0.5)], seed=0),
            make_run(root, "udec1", "udec", "iid", [_scored(160.0, clients=(120.0, 200.0), precision=0.84,
                                                            recall=0.6)], seed=1),
            make_run(root, "full0", "full", "label-skew", [_scored(100.0)], seed=0),
            make_run(root, "full2", "full", "label-skew", [_scored(90.0)], seed=2),
            make_run(root, "full1", "full", "label-skew", [_scored(90.0, samples=256)], seed=1),
            make_run(root, "usplit0", "usplit", "iid", [{"round": 1, "wall_s": 3.0}], seed=0)]
    text = write_report(runs, tmp_path / "out").read_text()
    section = text[text.index("## Ratio to centralized"):text.index("### Reference")]
    udec = next(line for line in section.splitlines() if line.startswith("| UDec · iid"))
    # seed 0: 150 / 50 = 3.0, seed 1: 160 / 40 = 4.0; the clients: 2, 4, 3, 5; the authors: 47.90 / 42.53
    assert udec == ("| UDec · iid | 0, 1 | 150.0 / 50.0, 160.0 / 40.0 | 3.00, 4.00 | 3.50 ± 0.50 | 2.00–5.00 "
                    "| 0.830 ± 0.010 | 0.550 ± 0.050 | 1.13 |")
    full = next(line for line in section.splitlines() if line.startswith("| Full · label-skew"))
    assert "| 0 | 100.0 / 50.0 | 2.00 | 2.00 (one seed: not yet a result) |" in full and full.endswith("| — |")
    assert "`full2`: no scored centralized run with seed 2" in section
    assert "`full1`: scored on 256 samples after round 2, its baseline `c1` on 1000 after round 2" in section
    assert "`usplit0`: no FD-CNN yet" in section


def test_the_ratio_figure_draws_each_seed_each_client_model_and_the_authors_ratio(
        tmp_path: Path, drawn: dict[str, plt.Figure]) -> None:
    root = tmp_path / "runs"
    runs = [make_run(root, "c0", "centralized", "iid", [_scored(50.0)], seed=0),
            make_run(root, "c1", "centralized", "iid", [_scored(40.0)], seed=1),
            make_run(root, "udec0", "udec", "iid", [_scored(150.0, clients=(100.0, 200.0))], seed=0),
            make_run(root, "udec1", "udec", "iid", [_scored(160.0, clients=(120.0, 200.0))], seed=1),
            make_run(root, "full0", "full", "iid", [_scored(100.0)], seed=0)]
    out = tmp_path / "out"
    assert "![ratio to centralized per setting](ratios.png)" in write_report(runs, out).read_text()
    assert (out / "ratios.png").stat().st_size > 0
    (ax,) = drawn["ratios.png"].axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["UDec · iid", "Full · iid"]
    points = {c.get_label(): sorted(map(tuple, np.round(c.get_offsets().data, 2).tolist())) for c in ax.collections}
    # UDec on row 0: seed 0 is 150 / 50, seed 1 is 160 / 40, the clients 2, 4, 3, 5; Full on row 1: 100 / 50
    assert points["seed 0"] == [(3.0, 0.0)]  # the second setting's seed 0 is unlabelled, drawn once per legend
    assert points["seed 1"] == [(4.0, 0.0)]
    assert points["a client's own model"] == [(2.0, 0.0), (3.0, 0.0), (4.0, 0.0), (5.0, 0.0)]
    assert points["mean over seeds"] == [(3.5, 0.0)]
    assert points["authors (Inception FID)"] == [(1.13, 0.0)]  # 47.90 / 42.53; the paper gives no Full FID
    full = [tuple(xy) for c in ax.collections for xy in np.round(c.get_offsets().data, 2).tolist() if xy[1] == 1.0]
    assert sorted(full) == [(2.0, 1.0), (2.0, 1.0)]  # its one seed and its mean; one global model, no grey dots


def test_collafuse_settings_are_told_apart_by_their_cut_ratio(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    runs = [make_run(root, "c0", "centralized", "iid", [_scored(50.0)])]
    for cut, fd in ((0.2, 75.0), (1.0, 100.0)):
        run = make_run(root, f"cf{cut}", "collafuse", "iid", [_scored(fd)])
        config = tomllib.loads((run / "config.toml").read_text())
        (run / "config.toml").write_text(tomli_w.dumps({**config, "collafuse": {"cut-ratio": cut}}))
        runs.append(run)
    section = write_report(runs, tmp_path / "out").read_text().split("## Ratio to centralized")[1]
    assert "| CollaFuse · iid · c = 0.2 | 0 | 75.0 / 50.0 | 1.50 |" in section
    assert "| CollaFuse · iid · c = 1 | 0 | 100.0 / 50.0 | 2.00 |" in section


def test_runs_from_before_the_seed_was_written_pair_but_show_no_seed(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    runs = [make_run(root, "c", "centralized", "iid", [_scored(50.0)]),
            make_run(root, "full", "full", "iid", [_scored(100.0)])]
    for run in runs:
        config = tomllib.loads((run / "config.toml").read_text())
        del config["seed"]
        (run / "config.toml").write_text(tomli_w.dumps(config))
    section = write_report(runs, tmp_path / "out").read_text().split("## Ratio to centralized")[1]
    assert "| Full · iid | ? | 100.0 / 50.0 | 2.00 |" in section


def test_a_report_without_a_scored_pair_has_no_ratio_section(tmp_path: Path) -> None:
    run = make_run(tmp_path / "runs", "c0", "centralized", "iid", [_scored(50.0)])
    assert "## Ratio to centralized" not in write_report([run], tmp_path / "out").read_text()
    assert not (tmp_path / "out" / "ratios.png").exists()


def test_grids_copied_beside_the_metrics_are_found(runs: list[Path], tmp_path: Path) -> None:
    """docs/results keeps a run's grids next to metrics.jsonl, not under samples/."""
    shutil.move(runs[0] / "samples" / "round-002.png", runs[0] / "round-002.png")
    text = write_report(runs, tmp_path / "out").read_text()
    assert "- `full-iid` (full · iid): [round 2 grid]" in text


def test_private_runs_show_their_epsilon_and_audit_and_other_reports_no_privacy_section(
        runs: list[Path], tmp_path: Path) -> None:
    assert "## Privacy" not in write_report(runs, tmp_path / "plain").read_text()
    private = make_run(tmp_path / "runs", "udec-dp", "udec", "iid", [
        {"round": 1, "wall_s": 3.0, "train": {"dp-epsilon": 4.1, "dp-sgd-epsilon": 1.5}},
        {"round": 2, "wall_s": 6.0, "train": {"dp-epsilon": 7.99, "dp-sgd-epsilon": 2.25}}])
    (private / "final-audit.json").write_text(json.dumps({"clients": [
        {"client": 0, "auc": 0.5, "tpr@1%fpr": 0.0}, {"client": 1, "auc": 0.7, "tpr@1%fpr": 0.02}]}))
    (runs[0] / "final-audit.json").write_text(json.dumps({"clients": [{"client": 0, "auc": 0.52, "tpr@1%fpr": 0.01}]}))
    (runs[1] / "final-audit.json").write_text("not json")  # an unreadable audit is left out, not a crash
    text = write_report([*runs, private], tmp_path / "out").read_text()
    section = text[text.index("## Privacy"):]
    row = next(line for line in section.splitlines() if line.startswith("| `udec-dp`"))
    assert "| 7.99 | 2.25 |" in row and "0.600 ± 0.100" in row and "0.010 ± 0.010" in row and row.endswith("| 2 |")
    assert "| `full-iid` | full | — | — |" in section and "| 0.520 |" in section
    assert "`udec-iid`" not in section and "`central`" not in section


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
    foreign = tmp_path / "other-project"  # the issue: any config.toml made a report of "?" and exit 0
    foreign.mkdir()
    (foreign / "config.toml").write_text('[tool]\nname = "x"\n[train]\nrounds = "many"\n')
    (foreign / "metrics.jsonl").write_text('{"round": 1}\n')
    starting = make_run(tmp_path / "runs", "starting", "full", "iid", [])
    (starting / "metrics.jsonl").unlink()  # the ServerApp writes it after the first round
    for bad, expected in ((not_a_run, "is not a run directory"), (tmp_path / "missing", "no such run"),
                          (broken, "metrics.jsonl:2: unreadable metrics line"),
                          (foreign, "is not a run directory: its config.toml is not a fedapp run's "
                                    "(no strategy.name, data.name, train.rounds)"),
                          (starting, "is not a run directory with a finished round (no metrics.jsonl)")):
        assert main(["report", str(runs[0]), str(bad), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("fedapp report: ")
        assert str(bad) in err and expected in err
    assert not (tmp_path / "out").exists()  # nothing written when an input is bad


def _embedded(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'(?:src|href)="data:image/png;base64,([^"]+)"', page)]


def test_html_report_is_the_markdown_one_with_every_image_inside(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    page = write_html(write_report(runs, out)).read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in page
    udec = next(row for row in re.findall(r"<tr>(.*?)</tr>", page, re.S) if "<code>udec-iid</code>" in row
                and "MB" in row)
    cells = re.findall(r"<td>(.*?)</td>", udec, re.S)
    assert cells[3] == "40.00 ± 5.00 (N=128, ddim-50, 2 client models, round 2)"
    assert cells[6:9] == ["0.265 M", "1.06 MB", "73.5 %"]
    assert "not comparable in absolute value with FD-CNN" in page and "<h2>Samples</h2>" in page
    assert not re.search(r'(?:src|href)="(?!data:)[^"]*\.png"', page)  # nothing left to fetch
    images = _embedded(page)
    assert len(images) == 10  # 7 figures and the 3 linked round grids
    drawn = [(out / name).read_bytes() for name in ("quality-fd-cnn.png", "communication.png", "samples.png",
                                                   "labels-udec-iid.png", "ratios.png")]
    assert all(figure in images for figure in drawn)
    assert images.count((runs[0] / "samples" / "round-002.png").read_bytes()) == 3
    assert page.count('download="round-002.png"') == 3


def test_cli_html_flag_prints_both_paths(runs: list[Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli-out"
    assert main(["report", *map(str, runs), "--out", str(out), "--html"]) == 0
    assert capsys.readouterr().out.splitlines() == [str(out / "report.md"), str(out / "report.html")]


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="needs Debian's chromium (apt-get install chromium; .ci/run installs it)")
def test_html_report_renders_in_headless_chromium_on_its_own(runs: list[Path], tmp_path: Path) -> None:
    """The page alone, moved out of its folder: the label plot (20 x 10 pure blue) shows only if embedded."""
    alone = tmp_path / "alone"
    alone.mkdir()
    page = shutil.copy(write_html(write_report(runs, tmp_path / "out")), alone / "report.html")
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,6000",
         Path(page).as_uri()],
        capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int64)
    assert pixels.shape == (6000, 1200, 3)
    assert pixels.std() > 20  # not blank: text, tables and plots
    assert int(np.all(pixels == (0, 0, 255), axis=-1).sum()) == 20 * 10  # the embedded label plot, whole
    written = np.where(pixels.min(axis=(1, 2)) < 200)[0]
    assert written.max() > 3000  # the page goes on past the quality figures (samples, tables)
