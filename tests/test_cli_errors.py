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
    from fedapp.deploy.simulation import merged_run_config

    conf = tmp_path / "demo.toml"
    conf.write_text('[train]\nrounds = 12\n\n[output]\nname = "demo"\n')
    assert merged_run_config([str(conf), 'output.dir="/runs"']) == ['train.rounds=12 output.name="demo" output.dir="/runs"']
    assert merged_run_config([str(conf)]) == [str(conf)]  # flwr reads a lone file itself
    assert merged_run_config(["seed=1"]) == ["seed=1"]
    with pytest.raises(ValueError, match="missing.toml"):
        merged_run_config([str(tmp_path / "missing.toml"), "seed=1"])
    # Key by key, the last value wins: flwr itself would let the second train.* pair drop train.lr.
    assert merged_run_config(["train.rounds=2 train.lr=0.1", 'train.rounds=3 data.name="cifar10"']) == \
        ['train.rounds=3 train.lr=0.1 data.name="cifar10"']
    with pytest.raises(ValueError, match="train.rounds==2"):
        merged_run_config(["seed=1", "train.rounds==2 x"])


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """argparse's refusal: exit 2 and one line on stderr, as ``fedapp`` prints it (no usage block)."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    out = capsys.readouterr()
    assert stop.value.code == 2 and out.out == ""
    return one_line_error(subprocess.CompletedProcess([], 2, out.out, out.err))


@pytest.mark.parametrize(("argv", "needles"), [
    (["comm", "--clients", "0"], ["fedapp comm: argument --clients: must be at least 1, got 0"]),
    (["comm", "--rounds", "0"], ["fedapp comm: argument --rounds: must be at least 1, got 0"]),
    (["comm", "--rounds", "two"], ["argument --rounds: 'two' is not a whole number"]),
    (["comm", "--dim", "2"], ["argument --dim: must be in [4, 512], got 2"]),
    (["comm", "--dim-mults", "1,0"], ["argument --dim-mults: must be comma-separated positive integers", "'1,0'"]),
    (["comm", "--channels", "0"], ["argument --channels: must be in [1, 4], got 0"]),
    (["comm", "--plot", "cumulative.svg"], ["argument --plot: 'cumulative.svg' is not a .png path"]),
    (["sample", "final.pt", "--n", "0"], ["fedapp sample: argument --n: must be at least 1, got 0"]),
    (["sample", "final.pt", "--steps", "0"], ["argument --steps: must be at least 1, got 0"]),
    (["sample", "final.pt", "--seed", "-1"], ["argument --seed: must be in [0, 4294967294], got -1"]),
    (["sample", "final.pt", "--client", "-2"], ["argument --client: must be at least 0, got -2"]),
    (["sample", "final.pt", "--sampler", "euler"], ["argument --sampler: invalid choice: 'euler'"]),
    (["check", "--partitions", "-1"], ["fedapp check: argument --partitions: must be at least 0, got -1"]),
    (["run", "--clients", "-3"], ["fedapp run: argument --clients: must be at least 0, got -3"]),
    (["resume", "some-run", "--rounds", "1.5"], ["argument --rounds: '1.5' is not a whole number"]),
    ([], ["fedapp: the following arguments are required: command"]),
])
def test_a_bad_argument_is_one_line_and_exit_2(argv: list[str], needles: list[str],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's three tracebacks (comm --clients 0, comm --rounds 0, sample --n 0) and their kin."""
    line = _refused(argv, capsys)
    assert all(n in line for n in needles), line
    assert line.endswith("--help)")


def test_folder_arguments_are_checked_before_anything_runs(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """--app must hold a pyproject.toml; --out of report and tradeoff must not be a file."""
    for command in (["run"], ["check"], ["resume", str(tmp_path)]):
        line = _refused([*command, "--app", str(tmp_path)], capsys)
        assert line == (f"fedapp {command[0]}: argument --app: {tmp_path} is not an app folder "
                        f"(no pyproject.toml) (see fedapp {command[0]} --help)")
    taken = tmp_path / "report"
    taken.write_text("a file")
    for command in ("report", "tradeoff"):
        assert f"argument --out: {taken} exists and is not a folder" in _refused(
            [command, str(tmp_path), "--out", str(taken)], capsys)
    assert taken.read_text() == "a file"


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out == f"fedapp {version('fedapp')}\n"


def test_help_is_quick_because_the_cli_imports_no_torch() -> None:
    """The issue measured 5 s (15 s on a busy machine) from torch and diffusers at cli.py's top."""
    import time

    probe = ("import sys; from fedapp.cli import build_parser; build_parser().format_help(); "
             "print(' '.join(m for m in ('torch', 'diffusers', 'matplotlib', 'fedapp.model.build') "
             "if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO,
                            check=True, timeout=60)
    assert loaded.stdout.strip() == ""
    started = time.perf_counter()
    out = fedapp("--help")
    elapsed = time.perf_counter() - started
    assert out.returncode == 0 and "sample" in out.stdout and "--version" in out.stdout
    assert elapsed < 2.0, f"fedapp --help took {elapsed:.2f} s"


@pytest.fixture
def tiny_run(tmp_path: Path) -> Path:
    """A run directory with two round checkpoints of a 4-wide UNet over a 10-step chain; its eval
    sampler (DDPM, 5 steps) is not the old DDIM-50 default."""
    from fedapp.config import parse_config
    from fedapp.model.build import build_model
    from fedapp.runs.checkpoint import save_checkpoint

    cfg = parse_config({"model.dim": 4, "model.dim-mults": "1", "diffusion.timesteps": 10,
                        "data.image-size": 8, "eval.sampler": "ddpm", "eval.sampler-steps": 5})
    run = tmp_path / "run"
    for rnd in (1, 2):
        save_checkpoint(run / "checkpoints" / f"round-{rnd:03d}.pt", cfg, rnd, build_model(cfg, seed=rnd))
    return run


def _grid_bytes(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[str, bytes]:
    assert main(["sample", *argv, "--n", "2", "--device", "cpu"]) == 0
    said = capsys.readouterr().out.strip().splitlines()[-1]
    return said, Path(said.rsplit(" to ", 1)[1]).read_bytes()


def test_sample_takes_a_run_directory_and_its_evaluation_sampler(tiny_run: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    said, default = _grid_bytes([str(tiny_run)], capsys)
    newest = tiny_run / "checkpoints" / "round-002.pt"
    assert said == f"wrote 2 samples (ddpm-5) from round 2 of {newest} to {newest.with_name('round-002-ddpm5-seed0.png')}"
    _, explicit = _grid_bytes([str(newest), "--sampler", "ddpm", "--steps", "5", "--out",
                               str(tiny_run / "explicit.png")], capsys)
    assert explicit == default  # the default is the config's sampler, to the pixel
    said, ddim = _grid_bytes([str(tiny_run), "--sampler", "ddim", "--out", str(tiny_run / "ddim.png")], capsys)
    assert "(ddim-5)" in said and ddim != default  # --sampler overrides, steps still the config's
    (tiny_run / "checkpoints" / "round-001.pt").rename(tiny_run / "final.pt")
    said, _ = _grid_bytes([str(tiny_run), "--out", str(tiny_run / "final.png")], capsys)
    assert f"from round 1 of {tiny_run / 'final.pt'} " in said  # final.pt before any round checkpoint


def test_sample_refuses_a_missing_or_empty_run_and_a_bad_step_count(tiny_run: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    for argv, expected in (
        ([str(tmp_path / "missing")], f"{tmp_path / 'missing'}: no such checkpoint or run directory"),
        ([str(tiny_run / "checkpoints" / "round-003.pt")], "no such checkpoint or run directory"),
        ([str(tiny_run / "samples")], "holds no final.pt and no checkpoints/round-NNN.pt to sample from"),
        ([str(tiny_run), "--steps", "20"], "--sampler ddpm --steps 20: sampler steps must be in [1, 10]"),
        ([str(tiny_run), "--sampler", "ddim", "--steps", "3"], "DDIM steps must divide T = 10"),
    ):
        (tiny_run / "samples").mkdir(exist_ok=True)
        assert main(["sample", *argv, "--device", "cpu"]) == 2
        out = capsys.readouterr()
        one_line_error(subprocess.CompletedProcess([], 2, out.out, out.err), "fedapp sample: ", expected)
    assert sorted(p.name for p in (tiny_run / "checkpoints").iterdir()) == ["round-001.pt", "round-002.pt"]
