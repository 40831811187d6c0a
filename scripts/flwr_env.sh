# Sourced by the run scripts: the repo root as working directory, a private Flower home, this venv.
# `fedapp run` is `flwr run` with a SuperLink on ports of its own (stopped afterwards) that exits
# non-zero unless the run logged every round and wrote final.pt.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export FLWR_HOME=${FLWR_HOME:-$(mktemp -d)}
export PATH="$PWD/.venv/bin:$PATH"

# run_once OUT NAME SUPERNODES RUN_CONFIG [MORE_CONFIG]: one `flwr run` into OUT/NAME, logged to
# OUT/NAME.log; a run that finished before (its final.pt exists) is skipped, and a failed one stops the
# script. MORE_CONFIG goes as a second --run-config, which `fedapp run` merges key by key: its keys
# override RUN_CONFIG's (one string may not name a key twice; plain flwr run would merge by section).
# FEDAPP_RESOURCES, when set, is passed as `fedapp run --resources` (the federation's Ray resources).
run_once() {
  local out=$1 name=$2 nodes=$3 config=$4 more=${5:-} start
  if [ -f "$out/$name/final.pt" ]; then echo "$name: done before"; return 0; fi
  rm -rf "${out:?}/$name"
  start=$(date +%s)
  fedapp run --clients "$nodes" ${FEDAPP_RESOURCES:+--resources "$FEDAPP_RESOURCES"} --run-config "output.dir=\"$out\" output.name=\"$name\" $config" \
    ${more:+--run-config "$more"} \
    > "$out/$name.log" 2>&1 || { echo "$name: FAILED, see $out/$name.log"; exit 1; }
  echo "$name: $(( $(date +%s) - start )) s"
}
