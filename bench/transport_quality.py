"""Bytes on the wire and sample quality per transport dtype, at the same seed and budget.

Each run is a whole federation in one process: the real strategy, the real ClientApp
handlers and the server's transport layer, with every message serialized by Flower's
own code to count its bytes. Quality is FD-CNN on N samples of the final model (Full,
USplit) or of each client's own model (ULatDec, UDec: mean ± std over clients).

    python -m bench.transport_quality --methods full,udec --dtypes float32,float16,bfloat16 \
        --clients 5 --rounds 4 --device cuda --metric-samples 1000
    python -m bench.transport_quality --methods full,usplit,ulatdec,udec --dtypes float32,float16 \
        --clients 5 --rounds 2 --max-steps 2 --metric-samples 0      # bytes only, a minute on a CPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from flwr.supercore.task_identity import TaskIdentity

from fedapp.config import parse_config
from fedapp.eval.quality import QualityMeter
from fedapp.model.build import build_diffusion, build_model
from fedapp.model.unet import part_sizes
from fedapp.protocol.methods import cumulative_cost, is_personalized
from fedapp.protocol.records import load_record, model_to_record
from fedapp.runs.checkpoint import load_checkpoint
from fedapp.runs.node_state import collect_node_models, state_root
from fedapp.train.loop import pick_device
from tests.support.inprocess import RUN_ID, InProcessRun


def one_run(method: str, dtype: str, args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    cfg = parse_config({
        "seed": 0, "model.dim": args.dim, "strategy.name": method, "transport.dtype": dtype,
        "train.rounds": args.rounds, "train.local-epochs": 1, "train.batch-size": args.batch, "train.lr": args.lr,
        "train.max-steps-per-round": args.max_steps, "train.device": args.device,
        "data.max-train-examples": args.examples, "diffusion.clip-sample": True, "strategy.min-nodes": args.clients,
        "eval.metric-samples": args.metric_samples, "eval.fid": "off", "eval.max-val-examples": 256,
        "output.progress": False, "train.node-state-dir": str(workdir / f"{method}-{dtype}"),
        "strategy.fraction-evaluate": 0.0,  # quality is measured below; client eval would only add messages
        "eval.sampler": args.sampler.split("-")[0], "eval.sampler-steps": int(args.sampler.split("-")[1]),
    })
    run = InProcessRun(cfg, node_ids=[101 + 7 * i for i in range(args.clients)])
    initial = None
    if args.init:
        model, _, _ = load_checkpoint(Path(args.init))
        initial = model_to_record(model)
    started = time.perf_counter()
    _, final = run.start(initial)
    seconds = time.perf_counter() - started
    train = run.ledger.totals(message_type="train")
    sizes = part_sizes(build_model(cfg))
    analytic = cumulative_cost(method, sizes, args.clients, args.rounds)[-1]
    row: dict[str, object] = {"method": method, "dtype": dtype, "seconds": round(seconds, 1), **train,
                              "analytic_params": analytic}
    if args.metric_samples:
        meter, diffusion = QualityMeter(cfg, pick_device(args.device)), build_diffusion(cfg)
        if is_personalized(method):
            states = collect_node_models(state_root(cfg.train.node_state_dir), RUN_ID).values()
        else:
            model = build_model(cfg)
            load_record(model, final)
            states = [model.state_dict()]
        scores = []
        for state in states:
            model = build_model(cfg)
            model.load_state_dict(state)
            scores.append(meter.measure(model, diffusion)[0]["fd-cnn"])
        row["fd_cnn_mean"], row["fd_cnn_std"] = float(np.mean(scores)), float(np.std(scores))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="full,udec")
    parser.add_argument("--dtypes", default="float32,float16,bfloat16")
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dim", type=int, default=28)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-steps", type=int, default=0, help="cap on steps per client and round (0: one epoch)")
    parser.add_argument("--examples", type=int, default=0, help="cap on the training pool (0: all 60,000)")
    parser.add_argument("--metric-samples", type=int, default=1000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sampler", default="ddpm-50", help="the evaluation sampler, KIND-STEPS")
    parser.add_argument("--init", default="", help="start from this checkpoint's model (a fine-tuning federation)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = RUN_ID, 1, 1  # type: ignore[attr-defined]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            for dtype in args.dtypes.split(","):
                rows.append(one_run(method, dtype, args, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
    base = next((r for r in rows if r["method"] == "full" and r["dtype"] == "float32"), None)
    print(f"\n{'method':<8}{'dtype':<10}{'params':>13}{'= analytic':>11}{'wire MB':>10}{'B/param':>8}"
          f"{'vs Full f32':>12}{'FD-CNN':>16}{'seconds':>9}")
    for r in rows:
        params = r["down_params"] + r["up_params"]  # type: ignore[operator]
        wire = r["down_wire"] + r["up_wire"]  # type: ignore[operator]
        ref = f"{100 * (wire / (base['down_wire'] + base['up_wire']) - 1):+.1f} %" if base else "-"  # type: ignore[operator]
        fd = f"{r['fd_cnn_mean']:.1f} ± {r['fd_cnn_std']:.1f}" if "fd_cnn_mean" in r else "-"
        print(f"{r['method']:<8}{r['dtype']:<10}{params:>13,}{str(params == r['analytic_params']):>11}"
              f"{wire / 1e6:>10.2f}{wire / params:>8.3f}{ref:>12}{fd:>16}{r['seconds']:>9}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
