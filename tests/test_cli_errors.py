"""Bad configuration and data from the command line: one line, a non-zero exit, nothing damaged.

``flwr run`` exits 0 even when the ServerApp stops on a bad config (it only reports the run),
so ``fedapp check`` is the preflight that fails the shell, and ``fedapp resume`` checks a run
before handing it to Flower.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from fedapp.cli import main
from tests.support.markers import needs_fmnist

REPO = Path(__file__).resolve().parents[1]


def fedapp(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedapp", *args], capture_output=True, text=True, cwd=cwd,
                          check=False, timeout=300)


def one_line_error(out: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert out.returncode != 0, out.stdout
    lines = [line for line in out.stderr.splitlines() if line.strip() and "Warning" not in line
             and not line.startswith("  ")]
    assert len(lines) == 1, out.stderr
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("args", "needles"), [
    (["--partitions", "2", "strategy.name=fedsgd"], ["strategy.name = 'fedsgd'", "'full', 'usplit'"]),
    (["--partitions", "2", "strategy.name=collafuse", "collafuse.cut-ratio=1.5"],
     ["collafuse.cut-ratio = 1.5", "less than or equal to 1"]),
    (["--partitions", "2", "collafuse.cut-ratio=-0.1"], ["collafuse.cut-ratio = -0.1"]),
    (["--partitions", "2", "data.name=cifar10", "data.root=/nonexistent/cifar", "data.download=false"],
     ["cifar"]),
    (["--partitions", "2", "data.name=folder", "data.root=/nonexistent/images"],
     ["/nonexistent/images", "does not exist"]),
    (["--partitions", "3", "strategy.min-nodes=4"], ["strategy.min-nodes = 4", "only 3 partitions"]),
    (["--partitions", "2", "train.rounds=0"], ["train.rounds = 0"]),
    (["--partitions", "2", "no-such.key=1"], ["unknown config key 'no-such'"]),
])
def test_fedapp_check_rejects_bad_config_in_one_line(args: list[str], needles: list[str],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """In process (``fedapp.cli.main`` is what ``python -m fedapp`` exits with), to keep CI short."""
    code = main(["check", *args])
    out = capsys.readouterr()
    one_line_error(subprocess.CompletedProcess([], code, out.out, out.err), "fedapp check:", *needles)


@needs_fmnist
def test_fedapp_check_rejects_more_partitions_than_images_and_passes_a_good_config() -> None:
    """Through the real command: the shell sees the exit code."""
    one_line_error(fedapp("check", "--partitions", "50", "data.max-train-examples=20"),
                   "50 partitions but only 20 examples")
    good = fedapp("check", "--partitions", "3", "strategy.name=udec")
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith("ok: udec on fashion-mnist, 3 iid partitions of ")


def test_fedapp_resume_refuses_an_unreadable_checkpoint_and_leaves_the_run_alone(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.toml").write_text('[train]\nrounds = 4\n[model]\ndim = 8\ndim-mults = "1,2"\n')
    (run / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2}\n')
    (run / "checkpoints" / "round-002.pt").write_bytes(b"\x00truncated")
    before = digests(run)
    one_line_error(fedapp("resume", str(run)), "fedapp resume:", "round-002.pt is not a readable fedapp checkpoint")
    one_line_error(fedapp("resume", str(tmp_path / "missing")), "fedapp resume:", "is not a run directory")
    (run / "checkpoints" / "round-002.pt").unlink()
    one_line_error(fedapp("resume", str(run)), "has no round checkpoint")
    (run / "checkpoints" / "round-002.pt").write_bytes(b"\x00truncated")
    assert digests(run) == before


def test_fedapp_sample_refuses_an_unreadable_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "final.pt"
    bad.write_text("not torch")
    one_line_error(fedapp("sample", str(bad)), "fedapp sample:", "not a readable fedapp checkpoint")
    assert bad.read_text() == "not torch" and sorted(p.name for p in tmp_path.iterdir()) == ["final.pt"]


def test_arguments_after_a_double_dash_go_to_flwr_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The README's ``fedapp resume RUN --rounds N -- <flwr args>`` and ``fedapp run ... -- <flwr args>``."""
    import fedapp.deploy.simulation as simulation

    calls: list[tuple[object, ...]] = []
    monkeypatch.setattr(simulation, "launch", lambda *a, **k: calls.append((*a, k)) or 0)
    assert main(["run", "--clients", "3", "--run-config", "train.rounds=2", "--", "--format", "json"]) == 0
    assert calls[-1][1:4] == (["train.rounds=2"], ["--format", "json"], "num-supernodes=3")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.toml").write_text("[train]\nrounds = 4\n")
    code = main(["resume", str(run), "--rounds", "6", "--", "--federation-config", "num-supernodes=3"])
    assert code == 2 and "has no round checkpoint" in capsys.readouterr().err  # parsed; refused on the run
    with pytest.raises(SystemExit):
        main(["check", "--", "x=1"])
    assert "fedapp check takes no arguments after --" in capsys.readouterr().err


def test_a_config_file_and_pairs_become_one_run_config_flwr_accepts(tmp_path: Path) -> None:
    """flwr run refuses TOML files alongside key=value pairs; fedapp run turns the files into pairs."""
    from fedapp.cli import merged_run_config

    conf = tmp_path / "demo.toml"
    conf.write_text('[train]\nrounds = 12\n\n[output]\nname = "demo"\n')
    assert merged_run_config([str(conf), 'output.dir="/runs"']) == ['train.rounds=12 output.name="demo" output.dir="/runs"']
    assert merged_run_config([str(conf)]) == [str(conf)]  # flwr reads a lone file itself
    assert merged_run_config(["seed=1"]) == ["seed=1"]
    with pytest.raises(ValueError, match="missing.toml"):
        merged_run_config([str(tmp_path / "missing.toml"), "seed=1"])
