# Two entry points: `make run` (install, then the default 5-client simulation) and
# `make test` (install, then the whole test suite). Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# `flwr run` starts the local SuperLink as `flower-superlink`, found on PATH: put the venv first.
export PATH := $(abspath $(BIN)):$(PATH)
CLIENTS ?= 5
# Flower's own home for this project, so a user's ~/.flwr is left alone.
export FLWR_HOME ?= $(CURDIR)/.flwr
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION = 1
RUN_CONFIG ?= output.dir="$(CURDIR)/runs"

.PHONY: install run run-paper test test-fast bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[test]'
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/flwr run . --stream \
	  --federation-config "num-supernodes=$(CLIENTS)" \
	  --run-config '$(RUN_CONFIG)'

# The paper's Fashion-MNIST setup; meant for a GPU shared by the 5 ClientApps.
run-paper: install
	$(BIN)/flwr run . --stream --run-config conf/paper-fmnist.toml \
	  --federation-config "num-supernodes=5 client-resources-num-cpus=2 client-resources-num-gpus=0.2"

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not e2e"

# The CPU benchmarks, one after another (never two torch jobs at once on a small machine).
# Figures and the GPU commands are in docs/BENCHMARKS.md. About 40 minutes on 2 cores.
bench: install
	$(BIN)/python -m bench.train_throughput --dim 16 --batch 64 --steps 60 --repeats 3
	$(BIN)/python -m bench.federation_overhead --rounds 3
	$(BIN)/python -m bench.transport_quality --methods full,udec --dtypes float32,float16,bfloat16 \
	  --clients 10 --rounds 15 --max-steps 1 --batch 16 --examples 2000 --metric-samples 0 --device cpu
	$(BIN)/python -m bench.deployment_cost --nodes 2 --workdir $(CURDIR)/.bench/deployment
	$(BIN)/python -m bench.federation_overhead --scaling

clean:
	rm -rf $(VENV) .flwr
