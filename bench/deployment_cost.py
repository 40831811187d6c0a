"""Seconds per message per node on Flower's deployment engine, and how much of it is not compute.

Each message starts a fresh ClientApp process on its SuperNode, so imports, data loading and model
building repeat on every message. This runs a tiny config on a loopback SuperLink + N SuperNodes
(scripts/local_deployment.py). FLWR_LOG_LEVEL=DEBUG on the SuperLink side (the nodes stay at INFO)
stamps the ServerApp's log lines with the time, which dates each phase:

- per round, the train and evaluate phases as the ServerApp sees them (sampling to aggregation);
  the nodes work in parallel, so a phase is the seconds one message costs one node;
- the overhead: the train phase minus the `train-seconds` (pure compute) the ClientApps report;
- the import time of `client_app.app` in a fresh interpreter, one component of that overhead.

    python -m bench.deployment_cost --nodes 2 --out cost.json
    python -m bench.deployment_cost --extra-config 'data.cache=false'   # the same, without the cache
    scripts/make_certs.sh /tmp/certs 2
    python -m bench.deployment_cost --tls-dir /tmp/certs --auth         # with TLS and registered nodes
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
from datetime import datetime
from pathlib import Path
from typing import Any

from fedapp.config import parse_overrides
from fedapp.deploy.local import REPO, LocalDeployment

SMALL = ("model.dim=8 model.dim-mults=1,2 data.max-train-examples=400 train.rounds=3 "
         "train.max-steps-per-round=2 train.batch-size=16 eval.every=0 eval.metric-samples=0 "
         "eval.fid=off output.progress=false")
# a Flower console line under DEBUG: level, local time with milliseconds, message (maybe coloured)
STAMPED = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\S*:\s+(.*)")
EVENTS = ("configure_train", "aggregate_train", "configure_evaluate", "aggregate_evaluate")


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


def phase_times(output: str) -> dict[int, dict[str, float]]:
    """Train and evaluate phase seconds per round, from the ServerApp's timestamped log lines."""
    stamps: dict[int, dict[str, float]] = {}
    current = 0
    for line in output.splitlines():
        match = STAMPED.search(line)
        if not match:
            continue
        when, message = match.groups()
        if round_match := re.match(r"\[ROUND (\d+)/\d+\]", message):
            current = int(round_match.group(1))
        event = message.split(":", 1)[0]
        if current and event in EVENTS:
            stamp = datetime.strptime(when, "%Y-%m-%d %H:%M:%S,%f").timestamp()
            stamps.setdefault(current, {})[event] = stamp
    phases = {}
    for rnd, s in stamps.items():
        if all(e in s for e in EVENTS):
            phases[rnd] = {"train_s": s["aggregate_train"] - s["configure_train"],
                           "evaluate_s": s["aggregate_evaluate"] - s["configure_evaluate"]}
    return phases


def run_dir(output: str, runs: Path) -> Path:
    found = re.search(r"fedapp run directory: (\S+)", output)
    if found:
        return Path(found.group(1))
    candidates = sorted(runs.glob("*/metrics.jsonl"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise SystemExit(f"no run directory under {runs}; the run failed, see its log")
    return candidates[-1].parent


def per_round(metrics: list[dict[str, Any]], phases: dict[int, dict[str, float]]) -> list[dict[str, Any]]:
    rows = []
    for row in metrics:
        rnd = row["round"]
        compute = float(row.get("train", {}).get("train-seconds", float("nan")))
        phase = phases.get(rnd, {})
        train_s = phase.get("train_s", float("nan"))
        rows.append({"round": rnd, "round_s": row["round_s"], "train_s": train_s,
                     "evaluate_s": phase.get("evaluate_s", float("nan")),
                     "train_compute_s": compute, "train_overhead_s": train_s - compute})
    return rows


def mean(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.fmean(r[key] for r in rows) if rows else float("nan")


def print_table(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"\ndeployment cost, {result['nodes']} nodes, {len(result['rounds'])} rounds; {m['date']}")
    print(f"machine: {m['cores']} cores, {m['cpu']}, load {m['load_avg_1m']} at start (shared machine)")
    print(f"extra config: {result['extra_config'] or '(none)'}")
    print(f"deployment start-up {result['startup_s']:.1f} s; flwr run {result['flwr_run_s']:.1f} s")
    print(f"{'round':>5} {'train s':>8} {'compute s':>10} {'overhead s':>11} {'evaluate s':>11} "
          f"{'round s':>8}")
    for r in result["rounds"]:
        print(f"{r['round']:>5} {r['train_s']:>8.2f} {r['train_compute_s']:>10.2f} "
              f"{r['train_overhead_s']:>11.2f} {r['evaluate_s']:>11.2f} {r['round_s']:>8.2f}")
    s = result["summary"]
    print(f"{'mean':>5} {s['train_s']:>8.2f} {s['train_compute_s']:>10.2f} {s['train_overhead_s']:>11.2f} "
          f"{s['evaluate_s']:>11.2f} {s['round_s']:>8.2f}")
    print(f"per message per node (a phase's wall time, the nodes working in parallel): train "
          f"{s['train_s']:.1f} s, of which compute {s['train_compute_s']:.1f} s and overhead "
          f"{s['train_overhead_s']:.1f} s; evaluate {s['evaluate_s']:.1f} s")
    print(f"one overhead component, `import client_app.app` in a fresh interpreter: "
          f"{result['import_s']:.2f} s (bare interpreter {result['python_start_s']:.2f} s)")


def run_config(nodes: int, workdir: Path, extra: str) -> dict[str, object]:
    config = parse_overrides(shlex.split(SMALL))
    config |= {"output.dir": str(workdir / "runs"), "train.node-state-dir": str(workdir / "nodes"),
               "strategy.min-nodes": nodes}
    return config | parse_overrides(shlex.split(extra))


def deploy_and_run(workdir: Path, nodes: int, config: dict[str, object], timeout: float,
                   result: dict[str, Any], tls_dir: Path | None = None,
                   auth: bool = False) -> list[dict[str, Any]]:
    """One run on a fresh deployment; its rounds, or an exit naming the log when it failed."""
    start = time.perf_counter()
    with LocalDeployment(workdir, nodes, link_env={"FLWR_LOG_LEVEL": "DEBUG"}, tls_dir=tls_dir,
                         auth=auth) as deployment:
        result["startup_s"] = time.perf_counter() - start
        start = time.perf_counter()
        done = deployment.run(config, timeout)
        result["flwr_run_s"] = time.perf_counter() - start
    metrics_path = run_dir(done.stdout, workdir / "runs") / "metrics.jsonl"
    lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
    metrics = [json.loads(line) for line in lines if line.strip()]
    expected = int(config.get("train.rounds", 0))  # type: ignore[call-overload]
    if not metrics or (expected and len(metrics) != expected):
        raise SystemExit(f"the run recorded {len(metrics)} of {expected} rounds; see {workdir}/flwr-run.log")
    return per_round(metrics, phase_times(done.stdout))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--extra-config", default="",
                        help="run-config k=v pairs applied after the small config, e.g. 'data.cache=false'")
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
    config = run_config(args.nodes, workdir, args.extra_config)
    result: dict[str, Any] = {"machine": machine(), "nodes": args.nodes, "extra_config": args.extra_config,
                              "tls": args.tls_dir is not None, "auth": args.auth,
                              "config": config, "workdir": str(workdir)}
    # before the deployment starts, so the two don't compete for the cores
    result["python_start_s"] = fresh_process_s("pass", args.import_repeats)
    result["import_s"] = fresh_process_s("import client_app.app", args.import_repeats)
    result["rounds"] = deploy_and_run(workdir, args.nodes, config, args.timeout, result, args.tls_dir, args.auth)
    result["summary"] = {k: mean(result["rounds"], k) for k in
                         ("round_s", "train_s", "evaluate_s", "train_compute_s", "train_overhead_s")}
    print_table(result)
    print(f"logs: {workdir}")
    if args.out:
        clean = json.loads(json.dumps(result), parse_constant=lambda _: None)  # NaN (not measured) -> null
        args.out.write_text(json.dumps(clean, indent=2) + "\n")
        print(f"figures: {args.out}")


if __name__ == "__main__":
    main()
