"""fedapp on Flower's deployment engine, on one machine: a SuperLink and N SuperNodes on loopback.

Unlike the simulation, every message starts a fresh ClientApp process on its SuperNode, as in a real
federation. A small try (about 5 minutes on 2 CPU cores):

    python -m fedapp.deploy.local --nodes 2 --workdir /tmp/fedapp-deployment -- \\
        model.dim=8 model.dim-mults=1,2 data.max-train-examples=400 train.rounds=3 \\
        train.max-steps-per-round=2 train.batch-size=16 eval.every=0 eval.metric-samples=0 eval.fid=off

The workdir gets one log per process, Flower's home (flwr-home/), the SuperLink's database, the runs
(runs/) and the nodes' state (nodes/). Only the processes started here are stopped, by process id.

Without options everything is plaintext (`--insecure`) and any SuperNode may join. With TLS and
SuperNode authentication, as a real federation would run:

    scripts/make_certs.sh /tmp/fedapp-certs 2
    python -m fedapp.deploy.local --nodes 2 --workdir /tmp/fedapp-deployment \\
        --tls-dir /tmp/fedapp-certs --auth -- ...

`--tls-dir` gives the SuperLink the CA, its certificate and key, and the SuperNodes and `flwr` the CA to
check it. `--auth` makes the SuperLink accept only SuperNodes whose public key was registered: the keys
node-<i>.pub are registered with `flwr supernode register` before SuperNode i starts with node-<i>.

`placement` (fedapp/deploy/netns.py) runs the SuperLink, each SuperNode and `flwr` in network namespaces
of their own, so the deployment crosses real interfaces: the SuperLink then listens on its namespace's
address only, which its certificate must name (scripts/make_certs.sh DIR N ADDRESS).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import IO

from fedapp.config import parse_overrides, run_config_arg, toml_value
from fedapp.deploy.netns import Place, Placement
from fedapp.deploy.processes import HOST, alive, descendants, free_ports, kill, signal_group

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the Flower CLIs start flower-superexec and the apps from PATH
CONNECTION = "local-deployment"
# Flower's SuperExec looks for a new task every 1 s unless told otherwise, so each message could wait
# up to a second before its ClientApp starts; every process gets 0.1 s unless the caller exports a value.
SUPEREXEC_POLL = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}


class LocalDeployment:
    """Context manager: the processes start on entry and are stopped on exit, exceptions included."""

    def __init__(self, workdir: Path, num_nodes: int, port: int | None = None, *,
                 env: Mapping[str, str] | None = None, link_env: Mapping[str, str] | None = None,
                 startup_timeout: float = 60.0, grace: float = 10.0, tls_dir: Path | None = None,
                 auth: bool = False, database: bool = True, placement: Placement | None = None) -> None:
        """`env` goes to every process; `link_env` only to the SuperLink and the ServerApp it starts.

        `tls_dir` holds what scripts/make_certs.sh writes; `auth` (needs it) admits registered nodes only.
        `database`: the SuperLink keeps its state and every message's objects in workdir/state.db, so it
        survives a restart; without, in memory (Flower's default), which moves messages faster.
        `placement` says which network namespace each process runs in; by default all are on loopback.
        """
        if auth and tls_dir is None:
            raise ValueError("SuperNode authentication needs TLS: pass tls_dir as well")
        self.workdir, self.num_nodes = Path(workdir).resolve(), num_nodes
        self.tls_dir, self.auth = (Path(tls_dir).resolve() if tls_dir else None), auth
        needed = ["ca.crt", "server.pem", "server.key"] if self.tls_dir else []
        needed += [f"node-{i}{ext}" for i in range(num_nodes) for ext in ("", ".pub")] if auth else []
        if self.tls_dir and (missing := [name for name in needed if not (self.tls_dir / name).is_file()]):
            raise FileNotFoundError(f"{self.tls_dir} lacks {', '.join(missing)}; "
                                    f"make them with scripts/make_certs.sh DIR {num_nodes}")
        ports = free_ports(num_nodes + 1)
        self.port = port or ports[0]
        self.node_ports = [p for p in ports if p != self.port][:num_nodes]
        self.placement = placement or Placement()
        self.address = f"{self.placement.superlink.address}:{self.port}"  # what nodes and `flwr` dial
        self.flwr_home = self.workdir / "flwr-home"
        self.startup_timeout, self.grace = startup_timeout, grace
        self.database = database
        self.env = {**SUPEREXEC_POLL, **os.environ, "FLWR_HOME": str(self.flwr_home),
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
        self.link_env = {**self.env, **(link_env or {})}
        self.procs: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []
        self.node_ids: list[int] = []  # as registered with --auth, in node order

    def __enter__(self) -> LocalDeployment:
        place = self.placement.superlink
        with place.socket() as sock:  # else the wait below could take another program for the SuperLink
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((place.address, self.port))
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "pids.txt").write_text("")  # for cleaning up by hand if this process is killed
        self._write_connection()
        try:
            state = ["--database", str(self.workdir / "state.db")] if self.database else []
            link = self._start("superlink", "flower-superlink", "--port", str(self.port), *state,
                               *self._link_security(), env=self.link_env, place=place, host=place.address)
            self._wait_for_port(self.port, "superlink", link, place, place.address)
            # A node whose key is not registered yet is refused at once, so register first.
            keys = [self._node_key(i) for i in range(self.num_nodes)] if self.auth else []
            self.node_ids = [self.register(key) for key in keys]
            nodes = [self._start(f"supernode-{i}", "flower-supernode", "--port", str(node_port),
                                 *self._node_security(keys[i] if keys else None),
                                 "--node-config", f"partition-id={i} num-partitions={self.num_nodes}",
                                 place=self.placement.supernode(i))
                     for i, node_port in enumerate(self.node_ports)]
            for i, (node_port, node) in enumerate(zip(self.node_ports, nodes)):  # fails here, not mid-run
                self._wait_for_port(node_port, f"supernode-{i}", node, self.placement.supernode(i))
            if self.auth:
                self._wait_online(nodes)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _write_connection(self) -> None:
        """Our own FLWR_HOME, so a user's ~/.flwr and its managed local SuperLink are never involved."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        security = (f"root-certificates = {toml_value(self.tls_dir / 'ca.crt')}\n" if self.tls_dir
                    else "insecure = true\n")
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.address}"\n{security}')

    def _link_security(self) -> list[str]:
        """One certificate serves the Fleet, Control and Runtime APIs; its SuperExec gets the CA from it."""
        if self.tls_dir is None:
            return ["--insecure"]
        tls = ["--ssl-ca-certfile", str(self.tls_dir / "ca.crt"), "--ssl-certfile",
               str(self.tls_dir / "server.pem"), "--ssl-keyfile", str(self.tls_dir / "server.key")]
        return tls + (["--enable-supernode-auth"] if self.auth else [])

    def _node_security(self, key: Path | None) -> list[str]:
        """TLS to the SuperLink only: a node's own Runtime API for its ClientApps stays plain on loopback."""
        link = ["--superlink", self.address]
        if self.tls_dir is None:
            return ["--insecure", *link]
        return [*link, "--root-certificates", str(self.tls_dir / "ca.crt"),
                *(["--auth-supernode-private-key", str(key)] if key else [])]

    def _node_key(self, i: int) -> Path:
        return self.tls_dir / f"node-{i}"  # type: ignore[operator]

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """A `flwr` command against this deployment's Flower home."""
        return subprocess.run(self.placement.flwr.command([str(BIN / "flwr"), *args]), capture_output=True,
                              text=True, env=self.env, cwd=self.workdir, timeout=timeout, check=False)

    def register(self, key: Path) -> int:
        """`flwr supernode register` for the private key `key` (its `.pub` beside it); the node id.

        Reads the default output: with `--format json`, flwr exits 0 even when the SuperLink refuses.
        """
        done = self.flwr("supernode", "register", str(key.with_name(key.name + ".pub")), CONNECTION)
        if done.returncode != 0 or not (found := re.search(r"SuperNode (\d+) registered", done.stdout)):
            raise RuntimeError(f"could not register {key}.pub:\n{done.stdout}{done.stderr}")
        return int(found.group(1))

    def nodes(self) -> list[dict[str, str]]:
        """`flwr supernode list`: every registered or self-registered node, with its status."""
        done = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        listing = json.loads(done.stdout) if done.returncode == 0 else {}
        if not listing.get("success"):
            raise RuntimeError(f"flwr supernode list failed:\n{done.stdout}{done.stderr}")
        return listing["nodes"]

    def start_node(self, key: Path | None, name: str = "supernode-extra", node_config: str = "",
                   place: Place | None = None) -> tuple[subprocess.Popen[bytes], Path]:
        """One more SuperNode, stopped with the rest; with --auth, one with an unregistered key is refused.

        Returns the process and its log; the caller waits for it as it sees fit.
        """
        (port,) = free_ports(1)  # the ports of running nodes are taken, so never handed out here
        args = [*self._node_security(Path(key).resolve() if key else None), "--port", str(port)]
        proc = self._start(name, "flower-supernode", *args,
                           *(["--node-config", node_config] if node_config else []), place=place)
        return proc, self.workdir / f"{name}.log"

    def _start(self, name: str, program: str, *args: str, env: Mapping[str, str] | None = None,
               place: Place | None = None, host: str = HOST) -> subprocess.Popen[bytes]:
        """A session of its own, so a Ctrl-C reaches only us and its group holds most of what it spawns.

        It runs in `place` (its network namespace), listening on `host` there: a SuperNode's API for its
        ClientApps stays on its namespace's loopback, the SuperLink listens on its place's address.
        """
        place = place or Place()
        handle = (self.workdir / f"{name}.log").open("wb")
        proc = subprocess.Popen(place.command([str(BIN / program), "--host", host, *args]), stdout=handle,
                                stderr=subprocess.STDOUT, env=env or self.env, cwd=self.workdir,
                                start_new_session=True)
        self.procs.append((proc, handle))
        with (self.workdir / "pids.txt").open("a") as pids:
            pids.write(f"{proc.pid} {name}\n")
        return proc

    def _wait_for_port(self, port: int, name: str, proc: subprocess.Popen[bytes], place: Place,
                       host: str = HOST) -> None:
        """`host`:`port` dialled from `place`'s network namespace, where `proc` runs."""
        log_path = self.workdir / f"{name}.log"
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}; see {log_path}")
            with place.socket() as sock, suppress(OSError):
                sock.settimeout(1.0)
                sock.connect((host, port))
                return
            time.sleep(0.2)
        raise TimeoutError(f"{name} did not accept connections on {host}:{port} "
                           f"within {self.startup_timeout:.0f} s; see {log_path}")

    def _wait_online(self, nodes: list[subprocess.Popen[bytes]]) -> None:
        """A node opens its port before the SuperLink admits it; a refused one exits only then."""
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            for i, node in enumerate(nodes):
                if node.poll() is not None:
                    raise RuntimeError(f"supernode-{i} exited with code {node.returncode}; "
                                       f"see {self.workdir / f'supernode-{i}.log'}")
            online = {int(n["node-id"]) for n in self.nodes() if n["status"] == "online"}
            if online >= set(self.node_ids):
                return
            time.sleep(0.5)
        raise TimeoutError(f"SuperNodes {self.node_ids} not all online within {self.startup_timeout:.0f} s")

    def stop(self) -> None:
        """SIGTERM to what we started and all it spawned, then SIGKILL to whatever outlives the grace.

        The tree is read before any signal: the SuperLink starts its SuperExec, and that the ServerApp,
        in sessions of their own, out of reach of our process groups and orphaned once a parent exits.
        """
        spawned = [child for proc, _ in self.procs for child in descendants(proc.pid)]
        for proc, _ in reversed(self.procs):
            signal_group(proc.pid, signal.SIGTERM)
        kill(spawned, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and (any(proc.poll() is None for proc, _ in self.procs)
                                               or any(alive(child) for child in spawned)):
            time.sleep(0.1)
        for proc, handle in self.procs:
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
            handle.close()
        kill(spawned, signal.SIGKILL)
        self.procs.clear()

    def run(self, run_config: Mapping[str, object], timeout: float, app: Path = REPO,
            echo: bool = False) -> subprocess.CompletedProcess[str]:
        """`flwr run --stream`, its output kept in flwr-run.log; exit 0 does not mean the run succeeded."""
        command = [str(BIN / "flwr"), "run", str(app), CONNECTION, "--stream"]
        if run_config:
            command += ["--run-config", run_config_arg(run_config)]
        command = self.placement.flwr.command(command)
        expired = threading.Event()
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=self.env, cwd=app, start_new_session=True) as proc:

            def expire() -> None:
                expired.set()
                signal_group(proc.pid, signal.SIGKILL)

            timer = threading.Timer(timeout, expire)
            timer.start()
            try:
                output = _tee(proc.stdout, self.workdir / "flwr-run.log", echo)  # type: ignore[arg-type]
                proc.wait()
            finally:
                timer.cancel()
                if proc.poll() is None:  # interrupted: leave no flwr behind
                    signal_group(proc.pid, signal.SIGKILL)
        if expired.is_set():
            raise subprocess.TimeoutExpired(command, timeout, output=output)
        return subprocess.CompletedProcess(command, proc.returncode, output)


def _tee(stream: IO[str], path: Path, echo: bool) -> str:
    """Written as it arrives, so a run cut short still leaves its log behind."""
    lines = []
    with path.open("w") as log:
        for line in stream:
            lines.append(line)
            log.write(line)
            log.flush()
            if echo:
                print(line, end="", flush=True)
    return "".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Overrides after -- are run-config k=v pairs.")
    parser.add_argument("--nodes", type=int, default=2, help="SuperNodes, one partition each")
    parser.add_argument("--workdir", type=Path, required=True, help="logs, Flower home, runs, node state")
    parser.add_argument("--port", type=int, default=None, help="SuperLink port (default: a free one)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed for the run")
    parser.add_argument("--tls-dir", type=Path, default=None,
                        help="TLS on, with the CA, certificate and keys of scripts/make_certs.sh DIR")
    parser.add_argument("--auth", action="store_true",
                        help="SuperNode authentication: register DIR/node-<i>.pub, admit only those")
    parser.add_argument("overrides", nargs="*", help="run config, e.g. train.rounds=2")
    args = parser.parse_args()
    if args.auth and args.tls_dir is None:
        parser.error("--auth needs --tls-dir (Flower allows SuperNode authentication only over TLS)")
    workdir = args.workdir.resolve()
    config: dict[str, object] = {"output.dir": str(workdir / "runs"), "strategy.min-nodes": args.nodes,
                                 "train.node-state-dir": str(workdir / "nodes"),
                                 **parse_overrides(args.overrides)}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `kill` still stops the deployment
    security = "plaintext" if args.tls_dir is None else "TLS, registered nodes only" if args.auth else "TLS"
    with LocalDeployment(workdir, args.nodes, args.port, tls_dir=args.tls_dir, auth=args.auth) as deployment:
        print(f"SuperLink on {deployment.address} ({security}), {args.nodes} SuperNodes; "
              f"logs in {workdir}", flush=True)
        result = deployment.run(config, args.timeout, echo=True)
    print(f"\nflwr run exited with {result.returncode}. Logs: {workdir}/superlink.log, "
          f"{workdir}/supernode-*.log, {workdir}/flwr-run.log; runs in {config['output.dir']}")
    sys.exit(result.returncode)


if __name__ == "__main__":
    main()
