#!/usr/bin/env bash
# Issue 16's ablation: `make run` (the defaults: 5 clients, Full, 5 rounds, all ClientApps at once) with
# one part of the training recipe turned off at a time, then all of them, each run scored by its own
# FD-CNN (256 DDPM-50 samples) and again on sample seeds 1 and 2 (bench/rescore.py), since one draw of
# 256 samples moves FD-CNN by about ±20. docs/BENCHMARKS.md holds the table.
# Usage: scripts/ablate_recipe.sh OUT_DIR [ARM...]   (about 9 minutes per arm on 2 cores; an arm whose
# run finished is not run again, and its scores are appended to OUT_DIR/scores.jsonl once)
set -euo pipefail
out=$(realpath -m "${1:?usage: $0 OUT_DIR [ARM...]}")
shift
source "$(dirname "$0")/flwr_env.sh"
mkdir -p "$out"
FEDAPP_RESOURCES=$(make -s --no-print-directory cpu-share)
export FEDAPP_RESOURCES

# The recipe the table was measured against, with the EMA on (the default turned it off after this
# ablation found it cost FD-CNN at this budget); each arm overrides it.
base="output.progress=false train.ema-decay=0.995"
declare -A arms=(
  [default]=""
  [no-ema]="train.ema-decay=0.0"
  [fresh-adam]='train.optimizer-state="fresh"'
  [no-warmup]="train.warmup-steps=0"
  [no-clip]="train.grad-clip=0.0"
  [no-min-snr]="diffusion.min-snr-gamma=0.0"
  [all-off]='train.ema-decay=0.0 train.optimizer-state="fresh" train.warmup-steps=0 train.grad-clip=0.0 diffusion.min-snr-gamma=0.0'
  [lr-decay]="train.final-lr-ratio=0.1"  # on, where the default is flat
)
order=(default no-ema fresh-adam no-warmup no-clip no-min-snr all-off lr-decay)
[ $# -gt 0 ] && order=("$@")
for name in "${order[@]}"; do
  [ -v "arms[$name]" ] || { echo "unknown arm: $name (known: ${!arms[*]})" >&2; exit 2; }
  run_once "$out" "$name" 5 "$base" "${arms[$name]}"
  grep -q "\"run\": \"$out/$name\"" "$out/scores.jsonl" 2>/dev/null \
    || python -m bench.rescore "$out/$name" --seeds 1 2 >> "$out/scores.jsonl"
done
