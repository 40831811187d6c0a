#!/usr/bin/env bash
# docs/RESULTS.md at CPU scale: the centralized baseline, then Full, USplit, ULatDec and UDec on IID and
# on label skew, same data, seed and budget, scored with FD-CNN; then one report over all nine runs.
# The baseline runs once: it pools the clients' training parts, and both partitions pool the same images
# but for each client's 10 % held-out share.
# Usage: scripts/reproduce_cpu.sh OUT_DIR   (about 80 minutes on 2 CPU cores; finished runs are skipped)
set -euo pipefail
out=$(realpath -m "${1:?usage: $0 OUT_DIR}")
source "$(dirname "$0")/flwr_env.sh"
mkdir -p "$out"
# 5 clients, 4,500 training images in all, 6 rounds of 1 local epoch at batch 32 (about 170 steps per
# client; the centralized baseline takes the same 27,000 image-steps as 850 steps on the pool).
# lr 1e-3 instead of the paper's 1e-4: at this budget 1e-4 barely leaves the noise.
scale='data.max-train-examples=5000 train.rounds=6 train.local-epochs=1 train.batch-size=32 train.lr=0.001'
# DDIM-25, as docs/RESULTS.md was measured; the default is now DDPM-50, which bench/eval_cost.py
# found much closer to the full chain (see docs/BENCHMARKS.md).
# The recipe docs/RESULTS.md was measured with, before issue 16's: a fresh Adam every round, no warm-up,
# clipping, Min-SNR weighting or EMA (the defaults now turn them on).
scale="$scale"' train.optimizer-state="fresh" train.warmup-steps=0 train.grad-clip=0.0 train.ema-decay=0.0 diffusion.min-snr-gamma=0.0'
scale="$scale"' eval.every=3 eval.metric-samples=256 eval.sampler="ddim" eval.sampler-steps=25 eval.fid="off" output.progress=false'
runs=(iid-centralized iid-full iid-usplit iid-ulatdec iid-udec
      label-skew-full label-skew-usplit label-skew-ulatdec label-skew-udec)
for name in "${runs[@]}"; do
  partitioner=${name%-*}
  method=${name##*-}
  run_once "$out" "$name" 5 "strategy.name=\"$method\" data.partitioner=\"$partitioner\" data.num-partitions=5 $scale"
done
fedapp report "${runs[@]/#/$out/}" --out "$out/report"
