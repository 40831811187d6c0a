"""``flwr run`` of this app in Flower's local simulation, with a Flower home and SuperLink of its own.

Flower's managed local SuperLink listens on 127.0.0.1:39091 whatever ``FLWR_HOME`` is, and
outlives ``flwr run``: a second checkout's run (or a test) would land on the first one's
SuperLink and its installed app. Here every session gets free ports of its own, and the
SuperLink it started is stopped on exit, found by PID through the FLWR_HOME on its command line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import click
from flwr.common.config import parse_config_args

from fedapp.config import flatten, run_config_arg
from fedapp.deploy.processes import free_ports, stop_pids, superlink_pids
from fedapp.deploy.ray_cluster import RAY_ADDRESS, ray_env
from fedapp.runs.rundir import RUN_DIR_LINE, unfinished

REPO = Path(__file__).resolve().parents[2]
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
BIN = Path(sys.executable).parent  # flwr starts flower-superlink by name, from PATH


def simulation_env(home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment for ``flwr``: its own FLWR_HOME and SuperLink ports, this venv first on PATH, and
    a Ray of its own unless RAY_ADDRESS names one (``fedapp.deploy.ray_cluster``)."""
    env = dict(os.environ if base is None else base)
    env.setdefault(RAY_ADDRESS, "local")
    http_port, control_port = free_ports(2)
    env.update({
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    })
    return env


@contextmanager
def flwr_home(tmp: Path) -> Iterator[dict[str, str]]:
    """``simulation_env`` under ``tmp/flwr-home``; stops the SuperLink it started on exit."""
    home = tmp / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    try:
        yield simulation_env(home)
    finally:
        stop_pids(superlink_pids(home))


def flwr_run(
    env: Mapping[str, str],
    run_config: Mapping[str, object],
    num_supernodes: int,
    timeout: float,
    resources: str = "client-resources-num-cpus=1",
    app: Path = REPO,
) -> subprocess.CompletedProcess[str]:
    """``flwr run --stream``; exit 0 does not mean the run succeeded: read its run directory."""
    cmd = flwr_command(app, [run_config_arg(run_config)], f"num-supernodes={num_supernodes} {resources}")
    return subprocess.run(cmd, env=dict(env), capture_output=True, text=True, timeout=timeout, check=False)


def flwr_command(app: Path, run_configs: list[str], federation_config: str = "", connection: str = "",
                 extra: list[str] | None = None) -> list[str]:
    """``flwr run APP [CONNECTION] --stream`` with these configs, from this venv."""
    return [str(BIN / "flwr"), "run", str(app), *([connection] if connection else []), "--stream",
            *(["--federation-config", federation_config] if federation_config else []),
            *[arg for config in run_configs for arg in ("--run-config", config)], *(extra or [])]


def _stream(command: list[str], env: Mapping[str, str]) -> tuple[int, Path | None]:
    """Run ``command``, echoing its output as it comes; (exit code, the run directory it named)."""
    run = None
    with subprocess.Popen(command, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if RUN_DIR_LINE in line:
                run = Path(_ANSI.sub("", line).split(RUN_DIR_LINE, 1)[1].strip())
    return proc.returncode, run


def launch(app: Path, run_config: list[str], flwr_args: list[str], federation_config: str = "",
           connection: str = "", ray_address: str = "") -> int:
    """``flwr run`` of ``app``; exit 0 only if the run it started logged every round and wrote final.pt.

    Without ``connection`` it is a local simulation: a SuperLink on ports of its own under this
    FLWR_HOME (default ``app/.flwr``), stopped when the run ends. Its Ray is one of its own, or the
    running cluster at ``ray_address`` (HOST:PORT of its head; see ``fedapp.deploy.ray_cluster``).
    """
    local = not connection
    if ray_address and not local:
        raise ValueError(f"--ray-address is for a local simulation; the SuperLink of {connection!r} starts "
                         "its simulation's Ray itself: set RAY_ADDRESS where it runs")
    home = Path(os.environ.get("FLWR_HOME") or app / ".flwr").resolve()
    env = simulation_env(home) if local else dict(os.environ)
    if local:  # before the SuperLink starts: it, and the simulation it starts, inherit RAY_ADDRESS
        env.update(ray_env(env, ray_address, federation_config))
    command = flwr_command(app, run_config, federation_config, connection, flwr_args)
    before = set(superlink_pids(home)) if local else set()
    started = time.time()
    try:
        code, run = _stream(command, env)
    finally:
        if local:
            stop_pids([pid for pid in superlink_pids(home) if pid not in before])
    if not code and run is not None and not local and not run.exists():
        print(f"fedapp: {run} is on the server's machine, not here: check it there", file=sys.stderr)
        return 0
    problem = f"flwr run exited with {code}" if code else (
        "the ServerApp never named its run directory (the run did not start)" if run is None
        else unfinished(run, since=started))
    if problem:
        print(f"fedapp: the run did not finish: {problem}; see the log above", file=sys.stderr)
        return code or 1
    print(f"fedapp: run finished: {run}")
    return 0


def merged_run_config(items: list[str]) -> list[str]:
    """``--run-config`` values as flwr run takes them: one value, later keys overriding earlier ones.

    flwr run refuses TOML files beside key=value pairs and a string that names a key twice, and it
    merges several strings section by section: a second string's ``train.*`` pairs drop the first
    one's other ``train.*`` keys. So a lone value goes as it is, and several (``make demo``: a config
    in conf/ and the run directory) become one string of pairs, key by key.
    """
    if len(items) <= 1:
        return items
    merged: dict[str, object] = {}
    for item in items:
        try:
            merged.update(flatten(tomllib.loads(Path(item).read_text())) if item.endswith(".toml")
                          else parse_config_args([item]))
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ValueError(f"--run-config {item}: {err}") from None
        except click.ClickException as err:
            raise ValueError(f"--run-config {item!r}: {err.message}") from None
    return [run_config_arg(merged)]
