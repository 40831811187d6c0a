#!/usr/bin/env bash
# The four FedDiffuse methods on the same data, seed and budget (the default config),
# one simulation each. Usage: scripts/compare_methods.sh OUT_DIR [extra run-config]
set -euo pipefail
out=$(realpath -m "${1:?usage: $0 OUT_DIR [extra run-config]}")
extra=${2:-}
source "$(dirname "$0")/flwr_env.sh"
for method in full usplit ulatdec udec; do
  fedapp run --clients 5 \
    --run-config "strategy.name=\"$method\" output.dir=\"$out\" output.name=\"$method\" output.progress=false $extra" \
    > "$out-$method.log" 2>&1 || { echo "$method: FAILED, see $out-$method.log"; exit 1; }
  echo "$method: done"
done
