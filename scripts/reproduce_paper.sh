#!/usr/bin/env bash
# FedDiffuse's Fashion-MNIST setup at full scale (conf/paper-fmnist.toml: K=5, E=5, R=15, the 3.0 M UNet,
# 60k images, Inception FID over 1000 DDPM-1000 samples), for a GPU shared by the 5 ClientApps:
# the centralized baseline, then Full, USplit, ULatDec and UDec under IID, label skew and quantity skew,
# then one report. Put the Inception FID weights in the torch hub cache first, or set eval.fid-weights.
# Usage: scripts/reproduce_paper.sh OUT_DIR [federation-config]   (finished runs are skipped)
set -euo pipefail
out=$(realpath -m "${1:?usage: $0 OUT_DIR [federation-config]}")
federation=${2:-"num-supernodes=5 client-resources-num-cpus=2 client-resources-num-gpus=0.2"}
source "$(dirname "$0")/flwr_env.sh"
mkdir -p "$out/conf"
runs=(iid-centralized)
for partitioner in iid label-skew quantity-skew; do
  for method in full usplit ulatdec udec; do runs+=("$partitioner-$method"); done
done
for name in "${runs[@]}"; do
  [ -f "$out/$name/final.pt" ] && { echo "$name: done before"; continue; }
  rm -rf "${out:?}/$name"
  # Flower takes a TOML file or key=value pairs, not both: write one file per run.
  python - "$name" "$out" <<'PY'
import sys, tomllib, tomli_w
name, out = sys.argv[1], sys.argv[2]
partitioner, method = name.rsplit("-", 1)
with open("conf/paper-fmnist.toml", "rb") as f:
    cfg = tomllib.load(f)
cfg["strategy"] = {"name": method}
cfg["data"] |= {"partitioner": partitioner, "num-partitions": 5}
cfg["output"] = {"dir": out, "name": name, "progress": False}
with open(f"{out}/conf/{name}.toml", "wb") as f:
    tomli_w.dump(cfg, f)
PY
  start=$(date +%s)
  fedapp run --clients 0 --resources "$federation" --run-config "$out/conf/$name.toml" > "$out/$name.log" 2>&1 \
    || { echo "$name: FAILED, see $out/$name.log"; exit 1; }
  echo "$name: $(( $(date +%s) - start )) s"
done
fedapp report "${runs[@]/#/$out/}" --out "$out/report"
