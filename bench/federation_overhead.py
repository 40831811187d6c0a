"""What a ``flwr run`` simulation costs beyond the training it does, and how it grows with K and width.

Overhead: a 5-client simulation whose time is mostly training, against a plain single-process
PyTorch loop that takes the same number of optimizer steps at the same batch on the same
model size. Both run in this one invocation, so the ratio is not skewed by a different day's
load. The run's own metrics split the rest: start-up before round 1, and per round the round
time minus the training the ClientApps report.

Scaling (``--scaling``): wall time and measured bytes for K = 2, 5, 10, 20 clients (fixed
steps per client) and for UNet widths dim = 8, 16, 28 with K = 5.

    python -m bench.federation_overhead --rounds 3 --out overhead.json
    python -m bench.federation_overhead --scaling --out scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.train_throughput import plain_loop
from fedapp.config import DataConfig
from fedapp.data.sources import load_split
from fedapp.deploy.simulation import flwr_home, flwr_run
from fedapp.model.unet import UNet
from fedapp.runs.rundir import read_jsonl

BASE: dict[str, Any] = {"eval.every": 0, "eval.metric-samples": 0, "eval.fid": "off", "output.progress": False,
                        "strategy.fraction-evaluate": 0.0, "train.lr": 1e-4, "data.val-fraction": 0.1}
ONE_AT_A_TIME = "client-resources-num-cpus=2"  # each ClientApp gets both cores, as the plain loop does


def simulate(tmp: Path, clients: int, config: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    out = tmp / f"runs-{clients}-{len(list(tmp.iterdir()))}"
    cfg = {**BASE, **config, "output.dir": str(out), "train.node-state-dir": str(tmp / "nodes"),
           "strategy.min-nodes": clients}
    with flwr_home(tmp / f"home-{out.name}") as env:
        start = time.perf_counter()
        done = flwr_run(env, cfg, clients, timeout=timeout, resources=ONE_AT_A_TIME)
        wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"flwr run failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")
    run_dir = next(out.iterdir())
    rows = read_jsonl(run_dir / "metrics.jsonl")
    comm = read_jsonl(run_dir / "comm.jsonl")
    train_s = [r["train"]["train-seconds"] * clients for r in rows]  # mean over clients x clients
    return {
        "clients": clients, "wall_s": round(wall, 1), "rounds_s": [r["round_s"] for r in rows],
        # start-up (SuperLink, Ray, ServerApp, round 0) and shut-down: the command's time outside the rounds
        "outside_rounds_s": round(wall - rows[-1]["wall_s"], 1),
        "client_train_s": [round(s, 1) for s in train_s],
        "steps_per_client": [r["train"]["train-steps"] for r in rows],
        "wire_bytes": sum(t["wire"] for t in comm), "params": sum(t["params"] for t in comm),
    }


def overhead(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    config = {"model.dim": args.dim, "train.rounds": args.rounds, "train.batch-size": args.batch,
              "data.max-train-examples": args.examples, "train.local-epochs": 1,
              "train.num-threads": args.threads}
    sim = simulate(tmp, args.clients, config)
    print(json.dumps(sim), flush=True)
    # the rows hold the example-weighted mean over clients; IID shares make it every client's count
    steps = int(round(sum(sim["steps_per_client"]))) * args.clients
    images = load_split(DataConfig(), "train").images
    torch.manual_seed(0)
    model = UNet(args.dim, (1, 2, 4), 1)
    plain_loop(model, images, args.batch, 3, 1e-4, torch.device("cpu"))
    start = time.perf_counter()
    plain_loop(model, images, args.batch, steps, 1e-4, torch.device("cpu"))
    plain_s = time.perf_counter() - start
    rest = [round(r - t, 1) for r, t in zip(sim["rounds_s"], sim["client_train_s"], strict=True)]
    return {**sim, "plain_steps": steps, "plain_s": round(plain_s, 1),
            "ratio": round(sim["wall_s"] / plain_s, 3), "per_round_rest_s": rest}


def scaling(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    rows = []
    fixed = {"train.rounds": 2, "train.max-steps-per-round": args.scaling_steps, "train.batch-size": 32,
             "data.max-train-examples": 8000}
    for k in (2, 5, 10, 20):
        rows.append({"vary": "clients", "dim": 16, **simulate(tmp, k, {**fixed, "model.dim": 16})})
        print(json.dumps(rows[-1]), flush=True)
    for dim in (8, 28):
        rows.append({"vary": "dim", "dim": dim, **simulate(tmp, 5, {**fixed, "model.dim": dim})})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--examples", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=0, help="train.num-threads for the ClientApps (0: torch's)")
    parser.add_argument("--scaling", action="store_true")
    parser.add_argument("--scaling-steps", type=int, default=5)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        if args.scaling:
            result: Any = scaling(args, tmp)
        else:
            result = overhead(args, tmp)
            print(json.dumps(result, indent=1))
            print(f"flwr run {result['wall_s']} s vs plain loop {result['plain_s']} s for the same "
                  f"{result['plain_steps']} steps: ratio {result['ratio']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
