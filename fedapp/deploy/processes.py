"""Processes the deployment and simulation launchers start, and how they are stopped: by process id only.

Linux: descendants and start times are read from /proc, so a reused pid is never signalled.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from contextlib import ExitStack, suppress
from pathlib import Path

HOST = "127.0.0.1"


def free_ports(count: int) -> list[int]:
    """Held open together, so the ports are distinct; a race with another program stays possible."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]


def signal_group(pgid: int, sig: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def kill(processes: list[tuple[int, str]], sig: int) -> None:
    for pid, _ in filter(alive, processes):
        with suppress(ProcessLookupError):
            os.kill(pid, sig)


def stat(pid: int | str) -> list[str]:
    """/proc/<pid>/stat after the name: [0] state, [1] parent pid, [19] start time. Linux only."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of every process below `pid`; the start time tells a reused pid apart."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        if fields := stat(entry.name):
            children.setdefault(int(fields[1]), []).append((int(entry.name), fields[19]))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += [child for child, _ in below]
    return found


def alive(process: tuple[int, str]) -> bool:
    fields = stat(process[0])
    return bool(fields) and fields[19] == process[1] and fields[0] != "Z"


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
    """SIGTERM, then SIGKILL for whatever is still alive after ``grace`` seconds."""
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
