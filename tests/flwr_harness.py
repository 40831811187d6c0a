"""Run the app with ``flwr run`` in a throwaway FLWR_HOME, and clean up after it.

``flwr run`` starts a detached, managed SuperLink that outlives the run. We stop the
one this harness started, found by PID through the FLWR_HOME path on its command line,
and never touch a SuperLink started by anyone else.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def superlink_pids(flwr_home: Path) -> list[int]:
    """PIDs of flower-superlink processes whose command line names this FLWR_HOME."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "flower-superlink" in cmdline and str(flwr_home) in cmdline:
            pids.append(int(proc.name))
    return pids


def stop_pids(pids: list[int], grace: float = 10.0) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@contextmanager
def flwr_home(tmp: Path) -> Iterator[dict[str, str]]:
    """An environment for ``flwr`` with its own FLWR_HOME; stops its SuperLink on exit."""
    home = tmp / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["FLWR_HOME"] = str(home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    try:
        yield env
    finally:
        stop_pids(superlink_pids(home))


def flwr_run(
    env: Mapping[str, str],
    run_config: Mapping[str, object],
    num_supernodes: int,
    timeout: float,
    resources: str = "client-resources-num-cpus=1",
) -> subprocess.CompletedProcess[str]:
    overrides = " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())
    cmd = [
        str(Path(sys.executable).parent / "flwr"), "run", str(REPO), "--stream",
        "--federation-config", f"num-supernodes={num_supernodes} {resources}",
        "--run-config", overrides,
    ]
    return subprocess.run(
        cmd, env=dict(env), capture_output=True, text=True, timeout=timeout, check=False
    )
