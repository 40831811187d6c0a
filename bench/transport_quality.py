"""Bytes on the wire and sample quality per transport, at the same seeds and budget.

Each run is a whole federation in one process: the real strategy, the real ClientApp
handlers and the server's transport layer, with every message serialized by Flower's
own code to count its bytes. Quality is FD-CNN on N samples of the final model (Full,
USplit) or of each client's own model (ULatDec, UDec: mean ± std over clients).

A transport is ``DTYPE[+delta][+ef][+tensor][+nearest]``: the dtype (float32, float16, bfloat16,
int8, int4), then the delta payload, error feedback, per-tensor scales and nearest rounding
(``transport.*`` in docs/configuration.md). Parameters are checked against the analytic count
and, for 8 and 4 bits, every message's bytes against ``fedapp.protocol.quantize.payload_bytes``.

    python -m bench.transport_quality --methods full,udec --transports float32,int8+delta,int4+delta+ef \
        --clients 5 --rounds 3 --seeds 0,1,2 --init model.pt --metric-samples 256
    python -m bench.transport_quality --methods full,usplit,ulatdec,udec --transports float32,int4+delta \
        --clients 5 --rounds 2 --max-steps 2 --metric-samples 0      # bytes only, a minute on a CPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.supercore.task_identity import TaskIdentity

from fedapp.config import parse_config, parse_overrides
from fedapp.eval.quality import QualityMeter
from fedapp.model.build import build_diffusion, build_model
from fedapp.model.unet import part_sizes, unet_parts
from fedapp.protocol.comm import CommLedger
from fedapp.protocol.methods import cumulative_cost, is_personalized, parts_keys, round_cost
from fedapp.protocol.quantize import BITS, payload_bytes
from fedapp.protocol.records import load_record, model_to_record
from fedapp.runs.checkpoint import load_checkpoint
from fedapp.runs.node_state import collect_node_models, state_root
from fedapp.train.loop import pick_device
from tests.support.inprocess import RUN_ID, InProcessRun

FLAGS = {"delta": ("transport.payload", "delta"), "ef": ("transport.error-feedback", True),
         "tensor": ("transport.scales", "tensor"), "nearest": ("transport.rounding", "nearest")}


def transport_overrides(spec: str) -> dict[str, object]:
    """``int4+delta+ef`` as run-config keys."""
    dtype, *flags = spec.split("+")
    unknown = [f for f in flags if f not in FLAGS]
    if unknown:
        raise SystemExit(f"transport {spec!r}: unknown flag {unknown[0]!r}; use {', '.join(FLAGS)}")
    return {"transport.dtype": dtype, **dict(FLAGS[f] for f in flags)}


def bytes_match(ledger: CommLedger, model: torch.nn.Module, dtype: str, per_channel: bool) -> bool:
    """Whether every message's bytes are the analytic size of the parts it carried, at 8 or 4 bits."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    parts = unet_parts(model)
    return all(t.bytes == sum(payload_bytes(shapes[k], dtype, per_channel)  # type: ignore[arg-type]
                              for k in parts_keys(t.parts, parts)) for t in ledger.transfers)


def one_run(method: str, spec: str, seed: int, args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    transport = transport_overrides(spec)
    cfg = parse_config({
        "seed": seed, "model.dim": args.dim, "strategy.name": method, **transport,
        "train.rounds": args.rounds, "train.local-epochs": 1, "train.batch-size": args.batch, "train.lr": args.lr,
        "train.max-steps-per-round": args.max_steps, "train.device": args.device,
        "data.max-train-examples": args.examples, "diffusion.clip-sample": True, "strategy.min-nodes": args.clients,
        "eval.metric-samples": args.metric_samples, "eval.fid": "off", "eval.max-val-examples": 256,
        "output.progress": False, "train.node-state-dir": str(workdir / f"{method}-{spec}-{seed}"),
        "strategy.fraction-evaluate": 0.0,  # quality is measured below; client eval would only add messages
        "eval.sampler": args.sampler.split("-")[0], "eval.sampler-steps": int(args.sampler.split("-")[1]),
        **parse_overrides(args.set),
    })
    run = InProcessRun(cfg, node_ids=[101 + 7 * i for i in range(args.clients)])
    initial = None
    if args.init:
        model, _, _ = load_checkpoint(Path(args.init))
        initial = model_to_record(model)
    started = time.perf_counter()
    _, final = run.start(initial)
    seconds = time.perf_counter() - started
    totals = run.ledger.totals()
    fresh = build_model(cfg)
    sizes = part_sizes(fresh)
    analytic = cumulative_cost(method, sizes, args.clients, args.rounds)[-1]
    if cfg.transport.payload == "delta" and not args.init:  # the seeded initialization is not sent
        analytic -= round_cost(method, sizes, args.clients, first_round=True).down
    row: dict[str, object] = {"method": method, "transport": spec, "seed": seed, "seconds": round(seconds, 1),
                              **totals, "analytic_params": analytic}
    if cfg.transport.dtype in BITS and not args.init:  # from a checkpoint, round 1 sends it whole
        row["bytes_analytic"] = bytes_match(run.ledger, fresh, cfg.transport.dtype, cfg.transport.scales == "channel")
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


def print_table(rows: list[dict[str, object]]) -> None:
    """One line per method and transport: bytes (the first seed's), FD-CNN mean ± std over seeds."""
    def wire(r: dict[str, object]) -> int:
        return r["down_wire"] + r["up_wire"]  # type: ignore[operator]

    base = next((r for r in rows if r["method"] == "full" and r["transport"] == "float32"), None)
    print(f"\n{'method':<8}{'transport':<16}{'params':>13}{'= analytic':>11}{'bytes = analytic':>17}{'wire MB':>10}"
          f"{'B/param':>8}{'vs Full f32':>12}{'FD-CNN over seeds':>20}{'seeds':>6}")
    groups: dict[tuple[str, str], list[dict[str, object]]] = {}
    for r in rows:
        groups.setdefault((str(r["method"]), str(r["transport"])), []).append(r)
    for (method, spec), runs in groups.items():
        r = runs[0]
        params = r["down_params"] + r["up_params"]  # type: ignore[operator]
        ref = f"{100 * (wire(r) / wire(base) - 1):+.1f} %" if base else "-"
        scores = [float(x["fd_cnn_mean"]) for x in runs if "fd_cnn_mean" in x]  # type: ignore[arg-type]
        fd = f"{np.mean(scores):.1f} ± {np.std(scores):.1f}" if scores else "-"
        print(f"{method:<8}{spec:<16}{params:>13,}{str(params == r['analytic_params']):>11}"
              f"{str(r.get('bytes_analytic', '-')):>17}{wire(r) / 1e6:>10.2f}{wire(r) / max(params, 1):>8.3f}"
              f"{ref:>12}{fd:>20}{len(runs):>6}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="full,udec")
    parser.add_argument("--transports", default="float32,float16,int8+delta,int4+delta+ef",
                        help="comma-separated DTYPE[+delta][+ef][+tensor][+nearest]")
    parser.add_argument("--seeds", default="0", help="comma-separated run seeds")
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
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="run-config overrides, TOML values (e.g. the recipe of the --init model)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = RUN_ID, 1, 1  # type: ignore[attr-defined]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            for spec in args.transports.split(","):
                for seed in (int(x) for x in args.seeds.split(",")):
                    rows.append(one_run(method, spec, seed, args, Path(tmp)))
                    print(json.dumps(rows[-1]), flush=True)
    print_table(rows)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
