# Sourced by the run scripts: the repo root as working directory, a private Flower home, this venv.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export FLWR_HOME=${FLWR_HOME:-$(mktemp -d)}
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export PATH="$PWD/.venv/bin:$PATH"  # flwr starts flower-superlink from PATH
