#!/usr/bin/env bash
# CollaFuse's trade-off at CPU scale: the cut ratio c in {0, 0.2, 0.5, 0.8, 1} on the same data, seed and
# draws, then one table and plot of per-client FD-CNN against disclosure and client compute share.
# Usage: scripts/collafuse_sweep.sh OUT_DIR   (about 46 minutes on 2 CPU cores; finished runs are skipped)
set -euo pipefail
out=$(realpath -m "${1:?usage: $0 OUT_DIR}")
source "$(dirname "$0")/flwr_env.sh"
mkdir -p "$out"
# 3 clients with 1,000 images each (900 train, 100 held out), 4 rounds of 1 local epoch at batch 32: every
# run draws the same 10,800 (x_t, t) pairs; c decides how many train each client's model and how many the
# server's. lr 1e-3 on both sides, as scripts/reproduce_cpu.sh. Scored once, after the last round:
# FD-CNN over 256 split-inference samples per client (DDPM-50).
scale='data.max-train-examples=3000 data.num-partitions=3 train.rounds=4 train.local-epochs=1 train.batch-size=32'
# The recipe docs/RESULTS.md was measured with, before issue 16's: a fresh Adam every round, no warm-up,
# clipping, Min-SNR weighting or EMA (the defaults now turn them on).
scale="$scale"' train.optimizer-state="fresh" train.warmup-steps=0 train.grad-clip=0.0 train.ema-decay=0.0 diffusion.min-snr-gamma=0.0'
scale="$scale"' train.lr=0.001 eval.every=4 eval.metric-samples=256 eval.fid="off" output.progress=false'
runs=()
for c in 0 0.2 0.5 0.8 1.0; do
  runs+=("$out/cut-$c")
  run_once "$out" "cut-$c" 3 "strategy.name=\"collafuse\" collafuse.cut-ratio=$c $scale"
done
fedapp tradeoff "${runs[@]}" --out "$out"
