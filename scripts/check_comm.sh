#!/usr/bin/env bash
# Measured against analytic communication: each FedDiffuse method as a real `flwr run` simulation with the
# paper's UNet (dim 28), one optimizer step per client per round, then `fedapp comm --check` on the runs.
# Usage: scripts/check_comm.sh OUT_DIR [K] [R]   (K=10, R=2: about 2 minutes a method on 2 CPU cores)
set -euo pipefail
out=$(realpath -m "${1:?usage: $0 OUT_DIR [K] [R]}")
clients=${2:-10}
rounds=${3:-2}
source "$(dirname "$0")/flwr_env.sh"
mkdir -p "$out"
setup="model.dim=28 data.max-train-examples=$((clients * 40)) data.num-partitions=$clients train.rounds=$rounds"
setup="$setup train.max-steps-per-round=1 train.batch-size=8 strategy.min-nodes=$clients strategy.fraction-evaluate=0.0"
setup="$setup eval.every=0 eval.metric-samples=0 output.progress=false"
for method in full usplit ulatdec udec; do
  name="k$clients-r$rounds-$method"
  rm -rf "${out:?}/$name"
  fedapp run --clients "$clients" --resources "client-resources-num-cpus=1" \
    --run-config "strategy.name=\"$method\" output.dir=\"$out\" output.name=\"$name\" $setup" \
    > "$out/$name.log" 2>&1 || { echo "$name: FAILED, see $out/$name.log"; exit 1; }
done
fedapp comm --clients "$clients" --rounds "$rounds"
fedapp comm --check "$out"/k"$clients"-r"$rounds"-*/
