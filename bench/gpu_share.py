"""Several ClientApps sharing one GPU, as a simulation with ``client-resources-num-gpus=1/P`` runs them.

Ray gives each ClientApp its own process; here P processes each answer training messages
with the real ClientApp handler at the same time, started together by a barrier. The
reference is one plain PyTorch loop alone on the GPU. Each process's peak memory is read
from NVML (CUDA context included) while all P hold their memory.

    python -m bench.gpu_share --procs 1,4 --dim 28 --batch 128 --steps 200 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import torch


def _nvml_used_mib() -> dict[int, float]:
    """GPU memory per process id, as the driver accounts it."""
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    return {p.pid: (p.usedGpuMemory or 0) / 2**20 for p in procs}


def _worker(kind: str, args: argparse.Namespace, start: mp.Barrier, hold: mp.Barrier, out: mp.Queue) -> None:  # type: ignore[type-arg]
    try:
        _work(kind, args, start, hold, out)
    except BaseException as err:  # the parent must hear of it rather than wait at a barrier
        out.put({"error": f"{type(err).__name__}: {err}"})
        start.abort()
        hold.abort()
        raise


def _work(kind: str, args: argparse.Namespace, start: mp.Barrier, hold: mp.Barrier, out: mp.Queue) -> None:  # type: ignore[type-arg]
    from bench.clientapp_call import ClientAppCaller, bench_config
    from bench.train_throughput import plain_loop
    from fedapp.config import DataConfig
    from fedapp.data.sources import load_split
    from fedapp.model.unet import UNet

    device = torch.device("cuda")
    if kind == "plain":
        images = load_split(DataConfig(), "train").images.to(device)
        model = UNet(args.dim, (1, 2, 4), 1).to(device)
        plain_loop(model, images, args.batch, 5, 1e-4, device)

        def work() -> None:
            plain_loop(model, images, args.batch, args.steps, 1e-4, device)
    else:
        caller = ClientAppCaller(bench_config(args.dim, args.batch, args.steps, "cuda"))
        caller.train()

        def work() -> None:
            caller.train()
    torch.cuda.synchronize()
    start.wait()
    began = time.perf_counter()
    for _ in range(args.rounds):
        work()
    torch.cuda.synchronize()
    ended = time.perf_counter()
    out.put({"pid": os.getpid(), "began": began, "ended": ended,
             "images": args.rounds * args.steps * args.batch,
             "reserved_mib": torch.cuda.max_memory_reserved() / 2**20,
             "allocated_mib": torch.cuda.max_memory_allocated() / 2**20})
    hold.wait()  # keep the memory while the parent reads NVML
    hold.wait()


def run(kind: str, procs: int, args: argparse.Namespace) -> dict[str, object]:
    ctx = mp.get_context("spawn")
    start, hold, out = ctx.Barrier(procs), ctx.Barrier(procs + 1), ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(kind, args, start, hold, out)) for _ in range(procs)]
    for w in workers:
        w.start()
    rows = [out.get(timeout=900) for _ in workers]
    if errors := [r["error"] for r in rows if "error" in r]:
        raise SystemExit(f"a worker failed: {errors[0]}")
    hold.wait()
    used = _nvml_used_mib()
    hold.wait()
    for w in workers:
        w.join()
    span = max(r["ended"] for r in rows) - min(r["began"] for r in rows)
    total = sum(r["images"] for r in rows) / span
    for r in rows:
        r["nvml_mib"] = used.get(r["pid"], float("nan"))
    return {"kind": kind, "procs": procs, "images_per_s": total, "span_s": span, "workers": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", default="1,4")
    parser.add_argument("--dim", type=int, default=28)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    total_mib = torch.cuda.get_device_properties(0).total_memory / 2**20
    print(f"device: {torch.cuda.get_device_name(0)} ({total_mib:.0f} MiB); torch {torch.__version__}; "
          f"UNet dim={args.dim}, batch {args.batch}, {args.rounds} messages x {args.steps} steps per process")
    results = [run("plain", 1, args)]
    results += [run("clientapp", int(p), args) for p in args.procs.split(",")]
    base = results[0]["images_per_s"]
    for r in results:
        peak = max(w["nvml_mib"] for w in r["workers"])  # type: ignore[union-attr]
        reserved = max(w["reserved_mib"] for w in r["workers"])  # type: ignore[union-attr]
        print(f"{r['kind']:>9} x{r['procs']}: {r['images_per_s']:8.0f} img/s in all "
              f"({r['images_per_s'] / base:.2f}x one plain loop); peak per process {peak:.0f} MiB "
              f"(torch reserved {reserved:.0f} MiB) = {peak / total_mib:.3f} of the GPU")
    if args.out:
        Path(args.out).write_text(json.dumps({"total_mib": total_mib, "results": results}, indent=2))


if __name__ == "__main__":
    main()
