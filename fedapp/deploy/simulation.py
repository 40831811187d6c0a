"""``flwr run`` of this app in Flower's local simulation, with a Flower home and SuperLink of its own.

Flower's managed local SuperLink listens on 127.0.0.1:39091 whatever ``FLWR_HOME`` is, and
outlives ``flwr run``: a second checkout's run (or a test) would land on the first one's
SuperLink and its installed app. Here every session gets free ports of its own, and the
SuperLink it started is stopped on exit, found by PID through the FLWR_HOME on its command line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from fedapp.config import run_config_arg
from fedapp.deploy.processes import free_ports, stop_pids, superlink_pids

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # flwr starts flower-superlink by name, from PATH


def simulation_env(home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment for ``flwr``: its own FLWR_HOME and SuperLink ports, this venv first on PATH."""
    env = dict(os.environ if base is None else base)
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
    cmd = [
        str(BIN / "flwr"), "run", str(app), "--stream",
        "--federation-config", f"num-supernodes={num_supernodes} {resources}",
        "--run-config", run_config_arg(run_config),
    ]
    return subprocess.run(cmd, env=dict(env), capture_output=True, text=True, timeout=timeout, check=False)
