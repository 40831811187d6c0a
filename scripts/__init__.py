"""Research and maintenance scripts, run as ``python -m scripts.NAME`` from the repository root."""
