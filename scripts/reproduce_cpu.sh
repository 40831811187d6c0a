#!/usr/bin/env bash
# Issue 16's CPU study, on the training recipe: the centralized baseline, Full, USplit, ULatDec and UDec
# under IID and label skew, and CollaFuse at c in {0, 0.2, 0.5, 1}, each for every seed given, at the
# scale of `make demo` (where Full reached FD-CNN 168), scored once at the end on 1,000 DDPM-50 samples.
#
# Usage: scripts/reproduce_cpu.sh OUT_DIR [SEED...]   (seeds default to 0 1)
#
# It takes hours on 2 CPU cores (about 45 minutes a federated run, more for the personalized methods,
# whose five clients each score their own model), so it is made to be stopped and run again:
#   - a run with final.pt, or whose results are already in the docs folder (a fresh machine), is done and
#     skipped; one with round checkpoints continues with `fedapp resume`; one without any is started over;
#   - every finished run's config, metrics and last grid are copied to docs/results/study/NAME/
#     (STUDY_DOCS overrides the folder), small enough to commit, and with STUDY_COMMIT=1 committed in the
#     repository that holds that folder (so the study can run from a worktree pinned to one commit);
#   - after the last run, one `fedapp report` over everything that finished.
# Round checkpoints live only in OUT_DIR and are not committed, so a run resumes only on the machine that
# holds them: on machines that are new each session, start a run only where it can finish (1-1.5 h each).
set -euo pipefail
out=$(realpath -m "${1:?usage: $0 OUT_DIR [SEED...]}")
shift
if [ $# -gt 0 ]; then seeds=("$@"); else seeds=(0 1); fi
source "$(dirname "$0")/flwr_env.sh"
docs=$(realpath -m "${STUDY_DOCS:-docs/results/study}")
mkdir -p "$out" "$docs"
FEDAPP_RESOURCES=$(make -s --no-print-directory cpu-share)
export FEDAPP_RESOURCES

# `make demo`'s scale and recipe (conf/demo.toml: the default recipe with the EMA on): 5 clients x
# 5,400 training images, 10 rounds of one local epoch at batch 16; evaluated once, after round 10.
# STUDY_ROUNDS and STUDY_SCALE (key=value pairs that override these) shrink it for a smoke test.
rounds=${STUDY_ROUNDS:-10}
scale="data.max-train-examples=30000 data.num-partitions=5 train.rounds=$rounds eval.every=$rounds"
scale="$scale train.ema-decay=0.995 eval.metric-samples=1000 eval.fid=\"off\" output.progress=false"

# study_run NAME CONFIG: finish the run OUT/NAME (skip, resume or start it), then copy its results to docs.
study_run() {
  local name=$1 config=$2 run="$out/$1" start
  if [ -f "$run/final.pt" ]; then
    echo "$name: done before"
  elif grep -qs "\"round\": $rounds," "$docs/$name/metrics.jsonl"; then
    echo "$name: done before, results in $docs/$name"; return 0
  elif ls "$run"/checkpoints/round-*.pt >/dev/null 2>&1; then
    start=$(date +%s)
    fedapp resume "$run" --rounds "$rounds" -- --federation-config "num-supernodes=5 $FEDAPP_RESOURCES" \
      >> "$out/$name.log" 2>&1 || { echo "$name: resume FAILED, see $out/$name.log"; exit 1; }
    echo "$name: resumed, $(( $(date +%s) - start )) s"
  else
    run_once "$out" "$name" 5 "$config" "${STUDY_SCALE:-}"
  fi
  mkdir -p "$docs/$name"
  cp "$run/config.toml" "$run/metrics.jsonl" "$docs/$name/"
  [ -f "$run/comm.jsonl" ] && cp "$run/comm.jsonl" "$docs/$name/"
  cp "$run"/samples/*.png "$docs/$name/" 2>/dev/null || true  # one evaluation round: its grids only
  cp "$run/label-distribution.png" "$docs/$name/" 2>/dev/null || true
  if [ "${STUDY_COMMIT:-0}" = 1 ] && [ -n "$(git -C "$docs/$name" status --porcelain -- .)" ]; then
    git -C "$docs/$name" add . && git -C "$docs/$name" commit -q -m "CPU study: $name finished" -- . \
      || echo "$name: not committed, commit $docs/$name by hand"
  fi
}

names=()
for seed in "${seeds[@]}"; do
  common="seed=$seed $scale"
  names+=("centralized-s$seed")
  study_run "centralized-s$seed" "strategy.name=\"centralized\" $common"
done
for partitioner in iid label-skew; do
  for method in full udec ulatdec usplit; do
    for seed in "${seeds[@]}"; do
      names+=("$partitioner-$method-s$seed")
      study_run "$partitioner-$method-s$seed" \
        "strategy.name=\"$method\" data.partitioner=\"$partitioner\" seed=$seed $scale"
    done
  done
done
for c in 0 0.2 0.5 1.0; do
  for seed in "${seeds[@]}"; do
    names+=("collafuse-c$c-s$seed")
    study_run "collafuse-c$c-s$seed" "strategy.name=\"collafuse\" collafuse.cut-ratio=$c seed=$seed $scale"
  done
done
finished=()
for name in "${names[@]}"; do [ -f "$out/$name/final.pt" ] && finished+=("$out/$name"); done
fedapp report "${finished[@]}" --out "$out/report"
