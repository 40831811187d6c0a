"""Where the seconds of a deployment message go, per node, on Flower's deployment engine.

Each message starts a fresh ClientApp process on its SuperNode, so process start, imports, data and
model repeat on every message. This runs a tiny config on a loopback SuperLink + N SuperNodes
(fedapp.deploy.local) with ``FLWR_LOG_LEVEL=DEBUG`` on every process: Flower then stamps its lines
with the time, and so does fedapp's logger, whose ClientApp marks its own milestones (handler entered,
data ready, model ready, computed, reply ready). All processes share one clock, so the milestones of
one message, from the ServerApp's ``configure_train`` through the SuperNode and its ClientApp back to
the ServerApp's ``aggregate_train``, split its wall time into consecutive segments (``SEGMENTS``).

    python -m bench.deployment_cost --nodes 2 --out cost.json                  # as a user gets it
    python -m bench.deployment_cost --untuned              # the 1 s SuperExec poll, the SuperLink's state on disk
    scripts/make_certs.sh /tmp/certs 2
    python -m bench.deployment_cost --tls-dir /tmp/certs --auth                # TLS and registered nodes

It also times ``import client_app.app`` in a fresh interpreter and keeps ``python -X importtime``'s
largest top-level imports, the part of a message that our own imports cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from fedapp.config import parse_overrides
from fedapp.deploy.local import REPO, SUPEREXEC_POLL, LocalDeployment

SMALL = ("model.dim=8 model.dim-mults=1,2 data.max-train-examples=400 train.rounds=3 "
         "train.max-steps-per-round=2 train.batch-size=16 train.num-threads=1 eval.every=0 "
         "eval.metric-samples=0 eval.fid=off output.progress=false")
# What the deployment's processes get unless --untuned: LocalDeployment's SuperExec poll of 0.1 s (the
# SuperNode's own 3 s poll is fixed in Flower), and the SuperLink's state in memory (Flower's default)
# rather than in LocalDeployment's state.db. --untuned restores Flower's 1 s poll and the database.
TUNED_ENV = SUPEREXEC_POLL
UNTUNED_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1"}
ANSI = re.compile(r"\x1b\[[0-9;]*m")
STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\S*:?\s+(.*)")
SERVER_EVENTS = ("configure_train", "aggregate_train", "configure_evaluate", "aggregate_evaluate")
# A SuperNode's (and its ClientApps') log line that marks a milestone of the message being handled.
NODE_MILESTONES = (
    ("receiving", re.compile(r"Receiving: (\S+) message")),  # the node's poll found it; download starts
    ("process up", re.compile(r"Start `flwr-clientapp` process")),  # the ClientApp: Python and flwr loaded
    ("message in", re.compile(r"\[flwr-clientapp\] Start FAB installation")),  # it holds the message
    ("app loading", re.compile(r"Loading ClientApp")),
    ("start", re.compile(r"fedapp: \S+ message: start")),  # our handler entered: client_app.app imported
    ("data ready", re.compile(r"fedapp: \S+ message: data ready")),
    ("model ready", re.compile(r"fedapp: \S+ message: model ready")),
    ("computed", re.compile(r"fedapp: \S+ message: computed")),
    ("reply ready", re.compile(r"fedapp: \S+ message: reply ready")),
    ("pushed", re.compile(r"Runtime\.PushMessages")),  # the reply is at the SuperNode
    ("sent", re.compile(r"Sent successfully")),  # ... and at the SuperLink
)
# (segment, from milestone, to milestone): consecutive, so they add up to the message's wall time.
SEGMENTS = (
    ("server push + SuperNode poll", "configure", "receiving"),
    ("ClientApp start (SuperExec poll, Python, flwr)", "receiving", "process up"),
    ("message download into the ClientApp", "process up", "message in"),
    ("FAB install", "message in", "app loading"),
    ("import client_app.app", "app loading", "start"),
    ("data (config, partition cache)", "start", "data ready"),
    ("model build + node state", "data ready", "model ready"),
    ("compute", "model ready", "computed"),
    ("records of the reply", "computed", "reply ready"),
    ("reply to the SuperNode", "reply ready", "pushed"),
    ("reply upload to the SuperLink", "pushed", "sent"),
    ("server reply poll + download", "sent", "aggregate"),
)


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or "unknown")


def machine() -> dict[str, Any]:
    """Figures from a shared 2-core box mean little without the box and its load beside them."""
    return {"cores": os.cpu_count(), "cpu": cpu_model(), "load_avg_1m": round(os.getloadavg()[0], 2),
            "python": sys.version.split()[0],
            "date": datetime.now().astimezone().isoformat(timespec="seconds")}


def fresh_process_s(code: str, repeats: int) -> float:
    """Median wall time of a new interpreter running `code`: what every ClientApp message pays again."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def import_profile(module: str, top: int = 8) -> list[dict[str, Any]]:
    """``python -X importtime``: the direct imports of ``module`` (and below) that cost the most, in s."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], cwd=REPO,
                          capture_output=True, text=True, check=True)
    rows = []
    for line in done.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            name = parts[2]
            depth = (len(name) - len(name.lstrip(" "))) // 2
            rows.append({"module": name.strip(), "depth": depth, "cumulative_s": int(parts[1]) / 1e6})
    shallow = [row for row in rows if 1 <= row["depth"] <= 3]
    total = next((row["cumulative_s"] for row in rows if row["module"] == module), float("nan"))
    return [{"module": module, "depth": 0, "cumulative_s": total},
            *sorted(shallow, key=lambda row: -row["cumulative_s"])[:top]]


def stamped(line: str) -> tuple[float, str] | None:
    match = STAMP.search(ANSI.sub("", line))
    if not match:
        return None
    when, text = match.groups()
    return datetime.strptime(when, "%Y-%m-%d %H:%M:%S,%f").timestamp(), text


def server_events(output: str) -> dict[int, dict[str, float]]:
    """Per round, the time of the ServerApp's configure_* and aggregate_* lines."""
    stamps: dict[int, dict[str, float]] = {}
    current = 0
    for line in output.splitlines():
        if (found := stamped(line)) is None:
            continue
        when, text = found
        text = text.removeprefix("fedapp: ")
        if round_match := re.match(r"\[ROUND (\d+)/\d+\]", text):
            current = int(round_match.group(1))
        event = text.split(":", 1)[0].strip()
        if current and event in SERVER_EVENTS:
            stamps.setdefault(current, {})[event] = when
    return stamps


@dataclass
class NodeMessage:
    """One message as a SuperNode's log tells it: its type and the time of each milestone."""

    kind: str
    times: dict[str, float] = field(default_factory=dict)


def node_messages(log_text: str) -> list[NodeMessage]:
    """The messages of one SuperNode's log, in order, each with the milestones that followed it."""
    messages: list[NodeMessage] = []
    for line in log_text.splitlines():
        if (found := stamped(line)) is None:
            continue
        when, text = found
        for name, pattern in NODE_MILESTONES:
            if match := pattern.search(text):
                if name == "receiving":
                    messages.append(NodeMessage(match.group(1).split(".")[0], {name: when}))
                elif messages:
                    messages[-1].times.setdefault(name, when)
                break
    return messages


def breakdown(events: dict[int, dict[str, float]], nodes: list[list[NodeMessage]]) -> list[dict[str, Any]]:
    """One row per message and node: its segments' seconds, the total, and the compute within it.

    A node's k-th message of a type answers round k (every node is sampled every round here).
    """
    rows = []
    for node, messages in enumerate(nodes):
        for kind in ("train", "evaluate"):
            for rnd, msg in enumerate((m for m in messages if m.kind == kind), start=1):
                if rnd not in events or f"configure_{kind}" not in events[rnd]:
                    continue
                times = {**msg.times, "configure": events[rnd][f"configure_{kind}"]}
                if f"aggregate_{kind}" in events[rnd]:
                    times["aggregate"] = events[rnd][f"aggregate_{kind}"]
                segments = {name: times[end] - times[begin] for name, begin, end in SEGMENTS
                            if begin in times and end in times}
                if len(segments) != len(SEGMENTS):
                    missing = [name for name, begin, end in SEGMENTS if name not in segments]
                    raise SystemExit(f"node {node}, {kind} message of round {rnd}: no milestone for "
                                     f"{', '.join(missing)}; was FLWR_LOG_LEVEL=DEBUG set on every process?")
                total = times["aggregate"] - times["configure"]
                rows.append({"node": node, "round": rnd, "kind": kind, "segments": segments,
                             "total_s": total, "non_compute_s": total - segments["compute"]})
    return rows


def summarize(rows: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """Mean over rounds and nodes of each segment, the total and the non-compute part."""
    mine = [row for row in rows if row["kind"] == kind]
    if not mine:
        return {}
    return {"messages": len(mine),
            "segments": {name: statistics.fmean(row["segments"][name] for row in mine) for name, _, _ in SEGMENTS},
            "total_s": statistics.fmean(row["total_s"] for row in mine),
            "non_compute_s": statistics.fmean(row["non_compute_s"] for row in mine),
            "non_compute_max_s": max(row["non_compute_s"] for row in mine)}


def print_table(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"\ndeployment cost, {result['nodes']} nodes, {result['rounds']} rounds; {m['date']}")
    print(f"machine: {m['cores']} cores, {m['cpu']}, load {m['load_avg_1m']} at start (shared machine)")
    print(f"settings: {result['settings']}; extra config: {result['extra_config'] or '(none)'}")
    print(f"deployment start-up {result['startup_s']:.1f} s; flwr run {result['flwr_run_s']:.1f} s")
    train, evaluate = result["summary"]["train"], result["summary"].get("evaluate", {})
    print(f"{'seconds per message per node (mean)':<50} {'train':>7} {'evaluate':>9}")
    for name, _, _ in SEGMENTS:
        ev = evaluate.get("segments", {}).get(name, float("nan"))
        print(f"{name:<50} {train['segments'][name]:>7.2f} {ev:>9.2f}")
    print(f"{'whole message':<50} {train['total_s']:>7.2f} {evaluate.get('total_s', float('nan')):>9.2f}")
    print(f"{'of which not compute':<50} {train['non_compute_s']:>7.2f} "
          f"{evaluate.get('non_compute_s', float('nan')):>9.2f}")
    print(f"`import client_app.app` in a fresh interpreter: {result['import_s']:.2f} s "
          f"(bare interpreter {result['python_start_s']:.2f} s); largest imports:")
    for row in result["imports"][1:]:
        print(f"  {row['module']:<40} {row['cumulative_s']:.2f} s")


def run_config(nodes: int, workdir: Path, rounds: int, extra: str) -> dict[str, object]:
    config = parse_overrides(shlex.split(SMALL))
    config |= {"output.dir": str(workdir / "runs"), "train.node-state-dir": str(workdir / "nodes"),
               "strategy.min-nodes": nodes, "train.rounds": rounds}
    return config | parse_overrides(shlex.split(extra))


def deploy_and_run(workdir: Path, nodes: int, config: dict[str, object], timeout: float, result: dict[str, Any],
                   env: dict[str, str], database: bool, tls_dir: Path | None = None,
                   auth: bool = False) -> list[dict[str, Any]]:
    """One run on a fresh deployment; one row per message and node, or an exit naming the log."""
    start = time.perf_counter()
    with LocalDeployment(workdir, nodes, env={"FLWR_LOG_LEVEL": "DEBUG", **env}, tls_dir=tls_dir, auth=auth,
                         database=database) as deployment:
        result["startup_s"] = time.perf_counter() - start
        start = time.perf_counter()
        done = deployment.run(config, timeout)
        result["flwr_run_s"] = time.perf_counter() - start
    events = server_events(done.stdout)
    expected = int(config.get("train.rounds", 0))  # type: ignore[call-overload]
    if sum("aggregate_train" in e for e in events.values()) != expected:
        raise SystemExit(f"the run did not finish its {expected} rounds; see {workdir}/flwr-run.log")
    logs = [(workdir / f"supernode-{i}.log").read_text(errors="replace") for i in range(nodes)]
    return breakdown(events, [node_messages(text) for text in logs])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--extra-config", default="",
                        help="run-config k=v pairs applied after the small config, e.g. 'data.cache=false'")
    parser.add_argument("--untuned", action="store_true",
                        help="the SuperExec's default 1 s poll and the SuperLink's state on disk, as before the cuts")
    parser.add_argument("--workdir", type=Path, default=None, help="logs and runs (default: a new temp dir)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed for flwr run")
    parser.add_argument("--import-repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--tls-dir", type=Path, default=None, help="TLS on, with scripts/make_certs.sh DIR")
    parser.add_argument("--auth", action="store_true", help="SuperNode authentication (needs --tls-dir)")
    args = parser.parse_args()
    if args.auth and args.tls_dir is None:
        parser.error("--auth needs --tls-dir")
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="fedapp-deployment-cost-"))).resolve()
    config = run_config(args.nodes, workdir, args.rounds, args.extra_config)
    env = UNTUNED_ENV if args.untuned else TUNED_ENV
    security = "TLS + auth" if args.auth else "TLS" if args.tls_dir else "plaintext"
    settings = f"{security}, {'untuned (state.db)' if args.untuned else 'tuned (in-memory state) ' + str(TUNED_ENV)}"
    result: dict[str, Any] = {"machine": machine(), "nodes": args.nodes, "rounds": args.rounds,
                              "extra_config": args.extra_config, "settings": settings, "tls": args.tls_dir is not None,
                              "auth": args.auth, "config": config, "workdir": str(workdir)}
    # before the deployment starts, so the two don't compete for the cores
    result["python_start_s"] = fresh_process_s("pass", args.import_repeats)
    result["import_s"] = fresh_process_s("import client_app.app", args.import_repeats)
    result["imports"] = import_profile("client_app.app")
    result["messages"] = deploy_and_run(workdir, args.nodes, config, args.timeout, result, env,
                                        database=args.untuned, tls_dir=args.tls_dir, auth=args.auth)
    result["summary"] = {kind: summarize(result["messages"], kind) for kind in ("train", "evaluate")}
    print_table(result)
    print(f"logs: {workdir}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"figures: {args.out}")


if __name__ == "__main__":
    main()
