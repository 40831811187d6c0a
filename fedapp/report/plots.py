"""Figures written to disk (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_cumulative_comm(curves: Mapping[str, Sequence[float]], path: Path, title: str) -> Path:
    """Cumulative parameters exchanged per method over rounds (FedDiffuse's Figure 4)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, values in curves.items():
        ax.plot(range(1, len(values) + 1), [v / 1e6 for v in values], marker="o", ms=3, label=method)
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative parameters exchanged (millions)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
