"""``fedapp run --ray-address``: a simulation on a running two-node Ray cluster, on loopback.

The cluster is two ``ray start --block`` processes (a head and a second node, one CPU each, each with
a ``--temp-dir`` and ports of its own, no dashboard). With ``client-resources-num-cpus=1`` Flower's
actor pool holds one ClientAppActor per node. Which node ran an actor is read from the process tree:
each actor is a worker process its node's raylet started, below that node's ``ray start`` process.
Both nodes' processes are stopped by PID (process group and descendants), never ``ray stop``,
which would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedapp.config import run_config_arg
from fedapp.deploy.processes import HOST, alive, descendants, free_ports, kill
from fedapp.deploy.simulation import BIN, REPO, flwr_home
from fedapp.runs.rundir import read_jsonl
from tests.support.markers import needs_fmnist

RAY = BIN / "ray"
ACTOR = "ClientAppActor"  # Flower's actor class; Ray titles its worker process "ray::ClientAppActor..."

TINY = {  # tests/test_e2e.py's TINY, four clients
    "model.dim": 8,
    "model.dim-mults": "1,2",
    "data.max-train-examples": 300,
    "train.rounds": 2,
    "train.batch-size": 32,
    "eval.every": 2,
    "eval.num-samples": 4,
    "eval.sampler-steps": 4,
    "eval.max-val-examples": 32,
    "eval.metric-samples": 16,
    "eval.fid": "off",
    "eval.max-reference-examples": 500,
    "output.name": "ray-cluster",
    "output.progress": False,
}


@dataclass
class RayNode:
    name: str
    proc: subprocess.Popen[bytes]
    temp_dir: Path
    log: Path
    actors: set[int] = field(default_factory=set)  # pids of ClientAppActor workers seen below this node

    def processes(self) -> list[tuple[int, str]]:
        return descendants(self.proc.pid)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.is_file() else ""


def _start(name: str, args: list[str], root: Path) -> RayNode:
    temp_dir, log = root / name, root / f"{name}.log"
    node_ports = free_ports(6)
    command = [str(RAY), "start", *args, "--block", "--node-ip-address", HOST, "--num-cpus", "1",
               "--num-gpus", "0", "--object-store-memory", str(80 * 2**20), "--temp-dir", str(temp_dir),
               "--disable-usage-stats", "--log-style", "record",
               "--node-manager-port", str(node_ports[0]), "--object-manager-port", str(node_ports[1]),
               "--runtime-env-agent-port", str(node_ports[2]), "--metrics-export-port", str(node_ports[3]),
               "--dashboard-agent-grpc-port", str(node_ports[4]),
               "--dashboard-agent-listen-port", str(node_ports[5])]
    with log.open("wb") as out:  # its own process group: stopped by its pgid, whatever Ray forks below it
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return RayNode(name, proc, temp_dir, log)


def _stop(nodes: list[RayNode], grace: float = 20.0) -> None:
    """SIGTERM to each node's process group, then SIGKILL to whatever of it (and below it) is left."""
    below = [p for node in nodes for p in node.processes()]
    for node in nodes:
        with suppress(ProcessLookupError):
            os.killpg(node.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and (any(n.proc.poll() is None for n in nodes) or any(map(alive, below))):
        time.sleep(0.2)
    for node in nodes:
        with suppress(ProcessLookupError):
            if node.proc.poll() is None:
                os.killpg(node.proc.pid, signal.SIGKILL)
        node.proc.wait(10)
    kill(below, signal.SIGKILL)


def _alive_nodes(address: str) -> list[dict[str, object]]:
    """``ray.nodes()`` (public) from a driver of its own, so this process never imports ray."""
    code = ("import json, ray; ray.init(address=%r, logging_level='ERROR'); "
            "print(json.dumps([{'id': n['NodeID'], 'cpus': n['Resources'].get('CPU', 0)} "
            "for n in ray.nodes() if n['Alive']]))") % address
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.fixture
def ray_cluster() -> Iterator[tuple[str, list[RayNode]]]:
    """A head and a second node on 127.0.0.1; skips only where Ray cannot start them."""
    # Not under tmp_path: Ray's AF_UNIX sockets live in <temp-dir>/session_*/sockets/, and a path over
    # 107 bytes cannot be bound; pytest's tmp_path is too deep for that.
    root = Path(tempfile.mkdtemp(prefix="fedapp-ray-", dir="/tmp"))
    nodes: list[RayNode] = []
    with ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, root, ignore_errors=True)
        cleanup.callback(_stop, nodes)
        port, client_port = free_ports(2)
        address = f"{HOST}:{port}"
        nodes.append(_start("head", ["--head", "--port", str(port), "--include-dashboard", "false",
                                     "--ray-client-server-port", str(client_port)], root))
        nodes.append(_start("worker", ["--address", address], root))
        deadline = time.monotonic() + 120
        while True:
            if dead := [n for n in nodes if n.proc.poll() is not None]:
                pytest.skip(f"Ray cannot start a cluster here: `ray start` ({dead[0].name}) exited with "
                            f"{dead[0].proc.returncode}: {dead[0].log_tail()[-600:]}")
            if time.monotonic() > deadline:
                pytest.skip("Ray cannot start a cluster here: two nodes did not register within 120 s: "
                            + " | ".join(n.log_tail()[-300:] for n in nodes))
            if all("Ray runtime started" in n.log_tail() for n in nodes):
                break
            time.sleep(0.5)
        yield address, nodes


class ActorWatch:
    """Samples, every 0.3 s, which ClientAppActor worker processes run below each node's ``ray start``."""

    def __init__(self, nodes: list[RayNode]) -> None:
        self.nodes, self.done = nodes, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self.done.wait(0.3):
            for node in self.nodes:
                for pid, _ in node.processes():
                    with suppress(OSError):
                        if ACTOR in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                            node.actors.add(pid)

    def __enter__(self) -> ActorWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()


@pytest.mark.e2e
@needs_fmnist
def test_a_simulation_places_clientapps_on_both_nodes_of_a_running_ray_cluster(
        ray_cluster: tuple[str, list[RayNode]], tmp_path: Path) -> None:
    address, nodes = ray_cluster
    alive_nodes = _alive_nodes(address)
    assert len(alive_nodes) == 2 and all(n["cpus"] == 1 for n in alive_nodes), alive_nodes

    runs = tmp_path / "runs"
    config = {**TINY, "output.dir": str(runs), "eval.stats-dir": str(tmp_path / "stats"),
              "train.node-state-dir": str(tmp_path / "nodes")}
    command = [sys.executable, "-m", "fedapp", "run", "--app", str(REPO), "--clients", "4",
               "--resources", "client-resources-num-cpus=1", "--ray-address", address,
               "--run-config", run_config_arg(config)]
    started = time.monotonic()
    with flwr_home(tmp_path) as env, ActorWatch(nodes):  # the SuperLink fedapp starts is stopped even on timeout
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=420, check=False)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "fedapp: run finished" in done.stdout
    assert [row["round"] for row in read_jsonl(runs / "ray-cluster" / "metrics.jsonl")] == [1, 2]
    assert (runs / "ray-cluster" / "final.pt").is_file()

    placed = {node.name: sorted(node.actors) for node in nodes}
    assert all(placed.values()), f"ClientAppActor pids per node: {placed}; {log[-3000:]}"
    assert not set(placed["head"]) & set(placed["worker"])
    print(f"ray cluster run: {time.monotonic() - started:.1f} s, ClientAppActor pids per "
          f"node {placed}, nodes {[str(n['id'])[:8] for n in alive_nodes]}")


def test_ray_address_is_refused_in_one_line_before_anything_starts(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad form, nothing listening, init-args for a cluster, a remote connection: one line, exit 2."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    (closed,) = free_ports(1)  # bound, then released: nothing listens there now
    cases = [
        (["--ray-address", "ray://10.0.0.5:10001"], "argument --ray-address: 'ray://10.0.0.5:10001' is not HOST:PORT"),
        (["--ray-address", "10.0.0.5"], "is not HOST:PORT of a Ray head"),
        (["--ray-address", f"{HOST}:{closed}"], f"--ray-address {HOST}:{closed}: no Ray head answers there"),
        (["--ray-address", f"{HOST}:{closed}", "--resources", "client-resources-num-cpus=1 init-args-num-cpus=4"],
         f"init-args-num-cpus cannot be set when joining the Ray cluster at {HOST}:{closed}"),
        (["--ray-address", f"{HOST}:{closed}", "--connection", "prod"], "--ray-address is for a local simulation"),
    ]
    for args, needle in cases:
        out = subprocess.run([sys.executable, "-m", "fedapp", "run", "--app", str(REPO), *args],
                             capture_output=True, text=True, timeout=120, check=False)
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode == 2 and len(lines) == 1 and needle in lines[0], (args, out.stderr)
    assert not (tmp_path / "flwr-home").exists(), "a refused run must not start a SuperLink"


def test_a_local_simulation_never_joins_a_cluster_by_accident(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --ray-address, ray.init() would join the last `ray start` on this machine; RAY_ADDRESS=local."""
    from fedapp.deploy.ray_cluster import ray_env
    from fedapp.deploy.simulation import simulation_env

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert simulation_env(Path("/nonexistent"))["RAY_ADDRESS"] == "local"
    assert ray_env({"RAY_ADDRESS": "local"}, "", "init-args-num-cpus=5") == {"RAY_ADDRESS": "local"}
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # the user's own choice is kept, and checked
    env = simulation_env(Path("/nonexistent"))
    assert env["RAY_ADDRESS"] == "10.0.0.5:6379"
    with pytest.raises(ValueError, match="init-args-num-gpus cannot be set when joining the Ray cluster at 10.0.0.5"):
        ray_env(env, "", "num-supernodes=4 init-args-num-gpus=1")
