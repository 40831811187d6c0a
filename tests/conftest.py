"""Shared fixtures, the Fashion-MNIST stand-in, and the loud line about tests that need the real data."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity
from matplotlib.figure import Figure

from fedapp.data.sources import DEBIAN_FASHION_MNIST_DIR
from fedapp.report import figures
from tests.support.mocks import RUN_ID
from tests.support.standin import have_fashion_mnist, write_standin

STANDIN: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    """No Fashion-MNIST where fedapp looks: write the stand-in, for this process and every one it starts."""
    global STANDIN
    if have_fashion_mnist():
        return
    root = Path(tempfile.mkdtemp(prefix="fedapp-fmnist-standin-"))
    write_standin(root / "FashionMNIST" / "raw")
    os.environ["FEDAPP_DATA_DIR"] = str(root)  # the default cache dir: looked at first, subprocesses inherit it
    STANDIN = root


def pytest_report_header(config: pytest.Config) -> str | None:
    if STANDIN is None:
        return None
    return (f"Fashion-MNIST: not in {DEBIAN_FASHION_MNIST_DIR}; the tests use a stand-in set in {STANDIN}, "
            "and the tests that need the real images skip")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.support.markers import REAL_FMNIST_REASON

    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if REAL_FMNIST_REASON in str(getattr(r, "longrepr", ""))]
    if skipped:
        names = ", ".join(r.nodeid.split("::")[-1] for r in skipped)
        terminalreporter.write_sep("!", f"{len(skipped)} TESTS SKIPPED without the real Fashion-MNIST "
                                   f"(apt-get install dataset-fashion-mnist): {names}", red=True, bold=True)


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lets tests build Flower Messages outside a run (flwr reads these ids)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", RUN_ID)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> dict[str, Figure]:
    """Every figure ``fedapp report`` or ``fedapp tradeoff`` saves, by file name, to check what is drawn on its axes."""
    figs: dict[str, Figure] = {}
    save = figures.save_figure

    def keep(fig: Figure, path: Path) -> Path:
        figs[path.name] = fig
        return save(fig, path)

    monkeypatch.setattr(figures, "save_figure", keep)
    return figs
