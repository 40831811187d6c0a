#!/usr/bin/env bash
# Issue 16, item 4: the paper's setup at a size one H100 finishes in under 10 minutes, everything included.
# Four runs share the one GPU at the same time, each its own `fedapp run` (its own SuperLink on free ports,
# its own Ray): the centralized baseline, Full, UDec and ULatDec, all IID, with the paper's 3.0 M UNet,
# K = 5 clients, R = 15 rounds, batch 128 and all 60k Fashion-MNIST training images (conf/gpu-study.toml:
# conf/paper-fmnist.toml's model and data with the project's training recipe). Each run is scored once,
# after round 15, on 1000 DDPM-50 samples: FD-CNN always, Inception FID only where its weights are on the
# machine (the torch hub cache, or GPU_STUDY_FID_WEIGHTS=FILE); the device machine has no network, so
# without them FID is turned off up front instead of trying a download. Then `fedapp report` over the four.
#
# Usage: scripts/gpu_study.sh OUT_DIR [COPY_DIR]
#   OUT_DIR   the four run directories, their logs (NAME.log), report/ and gpu-study.txt (the table)
#   COPY_DIR  gets 8 files, flat, for the device tool's $OUT (which brings back 8 files, 2 folders deep):
#             gpu-study.txt, report.md, metrics.jsonl (every run's rows, each with "run"), NAME-round-015.png
#             (each run's last grid) and gpu-study.tar.gz (configs, metrics, logs, grids, report/ + figures)
#   GPU_STUDY_SMOKE=1      the same four runs shrunk to a few minutes on a CPU (dim-8 UNet, 300 images,
#                          2 clients, 2 rounds of 2 steps, 16 samples of DDPM-4): proves the plumbing only
#   GPU_STUDY_DEADLINE=S   runs still going S seconds after the start are stopped and reported as failed
#                          (default 500 on the GPU: the report and the copy still get made inside 10 min)
#   GPU_STUDY_STEPS=N      optimizer steps per client and round (default: conf/gpu-study.toml's 30)
#   GPU_STUDY_RESOURCES=.. the federated runs' --resources (default: 1 CPU and 1/K of the GPU a ClientApp)
# It exits non-zero, after the report and the copy, when any run failed or hit the deadline.
#
# The budget (one H100; throughputs from docs/BENCHMARKS.md, "GPU: one ClientApp, four sharing a GPU"):
#   the paper UNet trains at 3,516 img/s at batch 128 in one plain process (train_local: 3,280), and
#   4 processes sharing the GPU reach 1.84x that together, ~6,500 img/s. Here 16 processes share it:
#   5 ClientApps (Ray actors, 0.2 GPU each) for each of the 3 federated runs, and the centralized baseline,
#   which trains inside its ServerApp process (server_app/centralized.py picks the GPU itself; its one
#   SuperNode is given no GPU and never called).
#   - a client: S = 30 steps x 128 = 3,840 images a round (its share is 10,800 images, 85 batches: the
#     cap binds), 15 rounds: 57,600 images; a federated run: 5 x 57,600 = 288,000 images (5.3 epochs of
#     the 54,000 training images; the paper's E x R = 75 epochs would need ~14x as long);
#   - the centralized baseline gets K x S = 150 steps a round, the same 288,000 images as a federation;
#   - together 4 x 288,000 = 1,152,000 images: 177 s at 6,500 img/s if the GPU stayed full. The baseline
#     is the longest single chain: while all 16 share the GPU each gets ~406 img/s, so the clients are
#     done after 57,600 / 406 = 142 s; the baseline then has 230,400 images left, alone at ~3,280 img/s:
#     70 s more. Training ~212 s; with 35 % for 16 processes where 4 were measured: ~290 s.
#   - fixed costs: preflight (data, partitions, reference statistics, once) ~15 s; start-up (SuperLink,
#     Ray, actors, imports; 35 s for one run on 2 cores in docs/BENCHMARKS.md) ~40 s; 15 rounds of
#     aggregation, checkpoints and round barriers ~2 s each, 30 s; the last round's evaluation: 12 models
#     (Full's and the baseline's, UDec's and ULatDec's 5 clients each) x 1000 samples x 50 steps = 600,000
#     UNet forward passes (~200,000 training images' worth) plus the features, ~40 s; report and copy ~20 s.
#   - in all ~355 s expected, ~435 s with the margin: about 7 minutes of the 10, and the deadline (500 s)
#     still leaves time for the report. 1000 metric samples fit (~10 % of the time); 40 steps a round
#     would put the margin case at ~9 minutes (training 290 x 40 / 30 = 387 s), too close to 10, so 30.
#
# On the device machine (docs/RESULTS.md, "Paper scale"). It has Python 3.12 and torch 2.11 (KINDS.md)
# but no flwr, ray, diffusers, pydantic, ... and no network, so the wheels and the data travel with the
# calls: 64 MiB a call, the repository (~6 MiB) included. Two calls, the second at once after the first
# (a machine goes back 30 s after a call; .venv, made by the first, stays on it for the second).
# Here, once, with PyPI reachable (nothing of this was downloaded when the script was written):
#   printf '/.whl/\n/.whl2/\n/.data/\n' >> .git/info/exclude
#   mkdir -p .data/FashionMNIST/raw && cp /usr/share/datasets/fashion-mnist/*.gz .data/FashionMNIST/raw/
#   dl() { d=$1; shift; python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d "$d" "$@"; }
#   dl .whl ray==2.55.1 flwr==1.42.0 flwr-datasets==0.6.1 datasets==4.8.5 pydantic==2.14.4 \
#     annotated-types==0.8.0 typing-inspection==0.4.5 pytorch-fid==0.3.0 opacus==1.6.0 tomli==2.5.0 \
#     tomli-w==1.2.0 dill==0.4.1 multiprocess==0.70.19 alembic==1.20.1 mako==1.4.3 greenlet==3.5.6 \
#     cffi==2.1.1 pycparser==3.12 iterators==0.0.2 grpcio-health-checking==1.81.1 prompt-toolkit==3.0.53 \
#     wcwidth==0.9.5 fastapi==0.138.2 starlette==1.3.1 uvicorn==0.49.0 httptools==0.9.0 watchfiles==1.3.0 \
#     websockets==17.4 python-dotenv==1.2.4 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 \
#     referencing==0.37.0 rpds-py==2026.9.1 importlib-metadata==10.2.0 lazy-importer==0.1.0 tzdata==2026.6
#   dl .whl2 diffusers==0.42.1 cryptography==50.0.2 sqlalchemy==2.1.9 pycryptodome==3.24.1 pydantic-core==2.50.5
#   zip -d .whl/ray-*.whl 'ray/jars/*'   # its Java workers, unused: ray's wheel is ~70 MiB, ~40 without
#   du -sh .whl .whl2 .data   # estimated ~47, ~19 and ~29 MiB: call 1 ~53 MiB with the repo, call 2 ~54
# The list is fedapp's dependencies that the device image lacks, at this repository's venv's versions
# (re-zipped here, ray 40 MiB without its jars, the rest 27 MiB). uv is left out: flwr uses it only to
# install app dependencies at run time, which fedapp turns off. pip --no-deps checks nothing, so a missing
# one shows as an ImportError in the preflight, before any run starts. Then the two calls of the device tool:
#   1. carry [".whl"], timeout_s 240, the command on one line:
#      set -e; python3 -m venv --without-pip .venv;
#      python3 -c 'import site; print(f"import site; site.addsitedir({site.getsitepackages()[0]!r})")' \
#        > .venv/lib/python3.12/site-packages/device.pth;
#      .venv/bin/python -m pip install -q --no-index --no-deps --no-compile .whl/*.whl;
#      .venv/bin/python -m pip install -q --no-index --no-deps --no-build-isolation -e .;
#      .venv/bin/fedapp --version; .venv/bin/python -c 'import torch, ray; print(torch.cuda.get_device_name())'
#      (device.pth puts the image's own torch, numpy, ... after the venv's packages, where a venv made from
#      the image's python would not see them; the venv is .venv, where scripts/flwr_env.sh finds fedapp and
#      flwr, and Ray starts its workers with the same python)
#   2. at once, carry [".whl2", ".data"], timeout_s 600:
#      test -x .venv/bin/fedapp || { echo 'no .venv: the machine went back, make call 1 again'; exit 3; };
#      .venv/bin/python -m pip install -q --no-index --no-deps --no-compile .whl2/*.whl &&
#      FEDAPP_DATA_DIR=$PWD/.data scripts/gpu_study.sh /tmp/gpu-study $OUT
#   OUT_DIR is outside $OUT (its hundreds of files would not come back); the 8 files of $OUT do.
# The Inception weights (~92 MiB) cannot travel within one call's limit, so FID stays off there.
# Device time: ~2 min to start, ~1 for call 1, ~8 for call 2: ~11 of the session's 15 minutes.
set -euo pipefail
usage="usage: $0 OUT_DIR [COPY_DIR]"
out=$(realpath -m "${1:?$usage}")
copy=${2:+$(realpath -m "$2")}
source "$(dirname "$0")/flwr_env.sh"
export PYTHONUNBUFFERED=1
started=$(date +%s)
config=conf/gpu-study.toml
mkdir -p "$out"
homes=$(mktemp -d)  # a FLWR_HOME per run: fedapp run stops the SuperLinks it finds under its home
trap 'rm -rf "$homes"' EXIT

# K, R and S from the config; the smoke mode's own, and the pairs that shrink everything else.
read -r K R S < <(python -c 'import sys, tomllib; c = tomllib.load(open(sys.argv[1], "rb"))
print(c["data"]["num-partitions"], c["train"]["rounds"], c["train"]["max-steps-per-round"])' "$config")
S=${GPU_STUDY_STEPS:-$S}
if [ "${GPU_STUDY_SMOKE:-0}" = 1 ]; then
  K=2 R=2 S=${GPU_STUDY_STEPS:-2}
  shrink='model.dim=8 model.dim-mults="1,2" data.max-train-examples=300 eval.metric-samples=16'
  shrink="$shrink eval.num-samples=16 eval.sampler-steps=4 eval.max-val-examples=64 train.device=\"cpu\""
  shrink="$shrink train.num-threads=1"
  resources=${GPU_STUDY_RESOURCES:-"client-resources-num-cpus=1 client-resources-num-gpus=0.0"}
  deadline=${GPU_STUDY_DEADLINE:-1800}
else
  shrink=""
  # Ray is told of the GPU rather than left to find it: a cluster that sees none never places an actor.
  resources=${GPU_STUDY_RESOURCES:-"client-resources-num-cpus=1 client-resources-num-gpus=$(python -c \
    "print(int(10000 / $K) / 10000)") init-args-num-gpus=1"}
  deadline=${GPU_STUDY_DEADLINE:-500}
fi

# FID only where the weights are here already: the machine has no network, and a download that cannot
# happen would cost every evaluating process its time-out.
fid_weights=${GPU_STUDY_FID_WEIGHTS:-}
fid=$(python -c 'import sys
from fedapp.eval.inception import FIDWeightsUnavailable, find_fid_weights
try:
    print("auto", find_fid_weights(sys.argv[1], download=False))
except FIDWeightsUnavailable as err:
    print("off", err)' "$fid_weights")
echo "FID: ${fid#* } (eval.fid = ${fid%% *})"
common="data.num-partitions=$K train.rounds=$R eval.every=$R eval.fid=\"${fid%% *}\""
[ -n "$fid_weights" ] && common="$common eval.fid-weights=\"$fid_weights\""
common="$common output.dir=\"$out\" $shrink"

# Preflight, once and before anything starts: the config parses, the GPU is there, the data is found, and
# the partitions and reference statistics are cached, so the runs neither race to make them nor fail late.
python - "$config" "$common" <<'PY'
import sys, time, tomllib
import torch
from flwr.common.config import parse_config_args
from fedapp.config import flatten, parse_config
from fedapp.data.share import local_data
from fedapp.eval.quality import QualityMeter
from fedapp.model.build import build_model
from fedapp.train.loop import pick_device

t0 = time.perf_counter()
with open(sys.argv[1], "rb") as f:
    cfg = parse_config(flatten(tomllib.load(f)) | parse_config_args([sys.argv[2]]))
if cfg.train.device == "cuda" and not torch.cuda.is_available():
    sys.exit("preflight: train.device = cuda but torch sees no GPU")
device = pick_device(cfg.train.device)
k = cfg.data.num_partitions
sizes = [len(local_data(cfg.data, cfg.seed, pid, k).train) for pid in range(k)]
spaces = sorted(QualityMeter(cfg, device).references)
params = sum(p.numel() for p in build_model(cfg).parameters())
gpu = f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""
print(f"preflight: {k} partitions of {min(sizes)}..{max(sizes)} training images, UNet {params:,} parameters, "
      f"{device}{gpu}, reference statistics {', '.join(spaces) or 'none'}, {time.perf_counter() - t0:.0f} s")
PY

# name, strategy, SuperNodes, resources, steps a round: the baseline gets a whole federation's steps.
runs=("centralized centralized 1 client-resources-num-cpus=1@client-resources-num-gpus=0.0 $((K * S))"
      "iid-full full $K ${resources// /@} $S"
      "iid-udec udec $K ${resources// /@} $S"
      "iid-ulatdec ulatdec $K ${resources// /@} $S")
echo "${#runs[@]} runs at once: K=$K, R=$R, $S steps a client and round (the baseline: $((K * S))), deadline $deadline s"
names=()
declare -A pid
set -m  # each run in a process group of its own, so that a deadline stops all of it
for spec in "${runs[@]}"; do
  read -r name method nodes res steps <<<"$spec"
  names+=("$name")
  rm -rf "${out:?}/$name" "$homes/$name.status"
  (
    begin=$(date +%s) rc=0
    FLWR_HOME="$homes/$name" fedapp run --clients "$nodes" --resources "${res//@/ }" --run-config "$config" \
      --run-config "strategy.name=\"$method\" output.name=\"$name\" train.max-steps-per-round=$steps $common" \
      || rc=$?
    echo "$rc $(( $(date +%s) - begin ))" > "$homes/$name.status"
  ) > "$out/$name.log" 2>&1 &
  pid[$name]=$!
  echo "$name: started ($method, $nodes SuperNode(s), $steps steps a round), log $out/$name.log"
  sleep 2  # staggered: four SuperLinks and three Ray clusters picking ports at the same instant
done
set +m

stopped=()
while :; do
  left=()
  for name in "${names[@]}"; do [ -f "$homes/$name.status" ] || left+=("$name"); done
  [ ${#left[@]} -eq 0 ] && break
  if [ $(( $(date +%s) - started )) -ge "$deadline" ]; then
    for name in "${left[@]}"; do
      echo "$name: still running ${deadline} s after the start: stopping it"
      kill -INT -- "-${pid[$name]}" 2>/dev/null || true
      stopped+=("$name")
    done
    for _ in $(seq 15); do  # fedapp stops its SuperLink on the interrupt; whatever is left after 15 s goes
      sleep 1
      alive=0
      for name in "${left[@]}"; do [ -f "$homes/$name.status" ] || alive=1; done
      [ "$alive" = 0 ] && break
    done
    for name in "${left[@]}"; do kill -KILL -- "-${pid[$name]}" 2>/dev/null || true; done
    break
  fi
  sleep 5
done
wait || true

failed=()
for name in "${names[@]}"; do
  if [[ " ${stopped[*]} " == *" $name "* ]]; then
    failed+=("$name"); echo "$name: FAILED, stopped at the deadline; see $out/$name.log"; continue
  fi
  read -r rc wall < "$homes/$name.status"
  echo "$wall" > "$out/$name.wall"
  if [ "$rc" -ne 0 ]; then
    failed+=("$name"); echo "$name: FAILED (exit $rc after $wall s); see $out/$name.log"
  else
    echo "$name: finished in $wall s"
  fi
  line=$(sed 's/\x1b\[[0-9;]*m//g' "$out/$name.log" | grep -a "round $R/$R |" | tail -n 1 || true)
  if [ -n "$line" ]; then echo "  round ${line#*round }"; else echo "  (no summary line for round $R)"; fi
done

# The table, and every run's rows in one file (the device brings back 8 files).
python - "$out" "$(( $(date +%s) - started ))" "${names[@]}" <<'PY' | tee "$out/gpu-study.txt"
import json, sys
from pathlib import Path
out, total, names = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]

def score(quality, key):
    if key not in quality:
        return "—"
    spread = f" ± {quality[key + '-std']:.1f}" if key + "-std" in quality else ""
    return f"{quality[key]:.1f}{spread}"

print("| run | rounds | FD-CNN | FID | precision / recall | wall s |")
print("|---|---|---|---|---|---|")
with open(out / "metrics.jsonl", "w") as merged:
    for name in names:
        path = out / name / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []
        for row in rows:
            merged.write(json.dumps({"run": name, **row}) + "\n")
        last = rows[-1] if rows else {}
        quality = next((r["quality"] for r in reversed(rows) if "quality" in r), {})
        pr = (f"{quality['fd-cnn-precision']:.2f} / {quality['fd-cnn-recall']:.2f}"
              if "fd-cnn-precision" in quality else "—")
        wall = (out / f"{name}.wall").read_text().strip() if (out / f"{name}.wall").is_file() else "—"
        print(f"| {name} | {last.get('round', 0)} | {score(quality, 'fd-cnn')} | {score(quality, 'fid')} "
              f"| {pr} | {wall} |")
print(f"\nthe four runs: {total} s from the start (FD-CNN and FID: lower is better; ± over the client models)")
PY

reportable=()
for name in "${names[@]}"; do
  [ -s "$out/$name/metrics.jsonl" ] && [ -f "$out/$name/config.toml" ] && reportable+=("$out/$name")
done
if [ ${#reportable[@]} -gt 0 ]; then
  fedapp report "${reportable[@]}" --out "$out/report" || failed+=("report")
fi
echo "study: $(( $(date +%s) - started )) s in all, results in $out" | tee -a "$out/gpu-study.txt"

if [ -n "$copy" ]; then
  mkdir -p "$copy"
  cp "$out/gpu-study.txt" "$out/metrics.jsonl" "$copy/"
  [ -f "$out/report/report.md" ] && cp "$out/report/report.md" "$copy/"
  parts=("gpu-study.txt" "metrics.jsonl")
  [ -d "$out/report" ] && parts+=("report")
  for name in "${names[@]}"; do
    parts+=("$name.log")
    [ -f "$out/$name.wall" ] && parts+=("$name.wall")
    for f in config.toml metrics.jsonl comm.jsonl label-distribution.png samples; do
      [ -e "$out/$name/$f" ] && parts+=("$name/$f")
    done
    grid=$(ls "$out/$name"/samples/round-*.png 2>/dev/null | grep -E '/round-[0-9]+\.png$' | tail -n 1 || true)
    [ -n "$grid" ] && cp "$grid" "$copy/$name-$(basename "$grid")"
  done
  tar -czf "$copy/gpu-study.tar.gz" -C "$out" "${parts[@]}"
  echo "copied to $copy: $(ls "$copy" | tr '\n' ' ')"
fi

if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}" >&2
  exit 1
fi
