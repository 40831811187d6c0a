# Two entry points: `make run` (install, then the default 5-client simulation) and
# `make test` (install, then the whole test suite). Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
CLIENTS ?= 5
RUN_CONFIG ?= output.dir="$(CURDIR)/runs"
# `fedapp run` is `flwr run` with a Flower home in .flwr/, a SuperLink on ports of its own (stopped
# afterwards; flower-superlink is started from this venv) and an exit code that says whether every
# round finished (flwr run exits 0 whatever became of the run).

.PHONY: install cpu-share run demo run-paper test test-fast bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Every ClientApp at once, each with its share of the cores: Ray is told of max(cores, clients) CPUs
# and gives each actor OMP_NUM_THREADS = its whole CPUs. On 2 cores the 5 ClientApps train with one
# torch thread each, 1.2x the images/s of Flower's default (one ClientApp at a time on both cores),
# and none waits for a free slot. (Flower takes whole CPUs only.)
CPU_SHARE ?= $(shell $(PYTHON) -c "import os; per = max(len(os.sched_getaffinity(0)) // $(CLIENTS), 1); \
  print(f'client-resources-num-cpus={per} init-args-num-cpus={per * $(CLIENTS)}')")
cpu-share:  # for scripts that run `make run`'s federation (scripts/ablate_recipe.sh)
	@echo "$(CPU_SHARE)"
run: install
	$(BIN)/fedapp run --clients $(CLIENTS) --run-config '$(RUN_CONFIG)' --resources "$(CPU_SHARE)"

# A federated model that draws garments (conf/demo.toml), under an hour on 2 cores. Run it again after
# an interruption and it resumes runs/demo at its last round checkpoint, up to the rounds conf/demo.toml
# gives now; a runs/demo without any checkpoint holds no training and is started over.
DEMO_DIR = $(CURDIR)/runs/demo
demo: install
	@if [ -f "$(DEMO_DIR)/final.pt" ]; then echo "$(DEMO_DIR) is finished (final.pt); move it away to run the demo again"; \
	elif ls "$(DEMO_DIR)"/checkpoints/round-*.pt >/dev/null 2>&1; then \
	  $(BIN)/fedapp resume "$(DEMO_DIR)" --rounds $$(sed -n 's/^rounds = //p' conf/demo.toml) \
	    -- --federation-config "num-supernodes=5 $(CPU_SHARE)"; \
	else rm -rf "$(DEMO_DIR)" && $(BIN)/fedapp run --clients 5 --run-config conf/demo.toml \
	  --run-config 'output.dir="$(CURDIR)/runs" output.name="demo"' --resources "$(CPU_SHARE)"; fi

# The paper's Fashion-MNIST setup; meant for a GPU shared by the 5 ClientApps.
run-paper: install
	$(BIN)/fedapp run --clients 5 --run-config conf/paper-fmnist.toml \
	  --resources "client-resources-num-cpus=2 client-resources-num-gpus=0.2"

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not e2e"

# The CPU benchmarks, one after another (never two torch jobs at once on a small machine).
# Figures and the GPU commands are in docs/BENCHMARKS.md. About 40 minutes on 2 cores.
bench: install
	$(BIN)/python -m bench.train_throughput --dim 16 --batch 64 --steps 60 --repeats 3
	$(BIN)/python -m bench.federation_overhead --rounds 3
	$(BIN)/python -m bench.transport_quality --methods full,udec --transports float32,float16,int8,int4,int8+delta,int4+delta \
	  --clients 10 --rounds 15 --max-steps 1 --batch 16 --examples 2000 --metric-samples 0 --device cpu
	$(BIN)/python -m bench.deployment_cost --nodes 2 --workdir $(CURDIR)/.bench/deployment
	$(BIN)/python -m bench.federation_overhead --scaling

clean:
	rm -rf $(VENV) .flwr
