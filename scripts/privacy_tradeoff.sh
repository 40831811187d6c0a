#!/usr/bin/env bash
# Issue 21's trade-off: `make run`'s federation (5 clients, 5 rounds, the default recipe) for Full and
# UDec, without DP and with client-level DP at epsilon 1, 4 and 8 (delta 1e-5, clip 1.0, the server's
# noise), and Full with sample-level DP-SGD at epsilon 8 (each image's gradient clipped to 1.0), each
# run then attacked by `fedapp audit` (loss-based membership inference, every client's images against
# held-out test images). docs/RESULTS.md holds the table.
#
# Usage: scripts/privacy_tradeoff.sh OUT_DIR [ARM...]   (about 10 minutes per arm on 2 cores; the DP-SGD
# arm about 4 times that, since it computes every image's gradient)
# A finished arm (final.pt and final-audit.json, or its results in the docs folder) is skipped. Each
# finished arm's config, metrics, audit and last grid are copied to docs/results/privacy/ARM/
# (PRIVACY_DOCS overrides the folder) and, with PRIVACY_COMMIT=1, committed there.
set -euo pipefail
out=$(realpath -m "${1:?usage: $0 OUT_DIR [ARM...]}")
shift
source "$(dirname "$0")/flwr_env.sh"
docs=$(realpath -m "${PRIVACY_DOCS:-docs/results/privacy}")
mkdir -p "$out" "$docs"
FEDAPP_RESOURCES=$(make -s --no-print-directory cpu-share)
export FEDAPP_RESOURCES

base="output.progress=false"
dp="privacy.clip=1.0 privacy.delta=1e-05"
declare -A arms=(
  [full]=''
  [full-dp-eps1]="$dp privacy.target-epsilon=1.0"
  [full-dp-eps4]="$dp privacy.target-epsilon=4.0"
  [full-dp-eps8]="$dp privacy.target-epsilon=8.0"
  [udec]='strategy.name="udec"'
  [udec-dp-eps1]="strategy.name=\"udec\" $dp privacy.target-epsilon=1.0"
  [udec-dp-eps4]="strategy.name=\"udec\" $dp privacy.target-epsilon=4.0"
  [udec-dp-eps8]="strategy.name=\"udec\" $dp privacy.target-epsilon=8.0"
  [full-dpsgd-eps8]="privacy.sample-clip=1.0 privacy.delta=1e-05 privacy.sample-target-epsilon=8.0"
)
order=(full udec udec-dp-eps8 udec-dp-eps4 udec-dp-eps1 full-dp-eps8 full-dp-eps4 full-dp-eps1 full-dpsgd-eps8)
[ $# -gt 0 ] && order=("$@")
for name in "${order[@]}"; do
  [ -v "arms[$name]" ] || { echo "unknown arm: $name (known: ${!arms[*]})" >&2; exit 2; }
  if [ -f "$docs/$name/final-audit.json" ]; then echo "$name: done before, results in $docs/$name"; continue; fi
  run_once "$out" "$name" 5 "$base" "${arms[$name]}"
  # make run's config leaves data.num-partitions to the federation: the audit is told the 5 clients.
  [ -f "$out/$name/final-audit.json" ] \
    || fedapp audit "$out/$name" --members 500 --nonmembers 500 --draws 4 --num-partitions 5 \
      >> "$out/$name.log" 2>&1 || { echo "$name: audit FAILED, see $out/$name.log"; exit 1; }
  mkdir -p "$docs/$name"
  cp "$out/$name/config.toml" "$out/$name/metrics.jsonl" "$out/$name/final-audit.json" "$docs/$name/"
  last=$(ls "$out/$name"/samples/round-*.png 2>/dev/null | sort | tail -1)
  [ -n "$last" ] && cp "$last" "$docs/$name/"
  if [ "${PRIVACY_COMMIT:-0}" = 1 ]; then
    git -C "$docs/$name" add . && git -C "$docs/$name" commit -q -m "Privacy trade-off: $name finished" -- . \
      || echo "$name: not committed, commit $docs/$name by hand"
  fi
  echo "$name: audited"
done
