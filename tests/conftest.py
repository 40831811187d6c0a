"""Shared fixtures."""

from __future__ import annotations

import pytest
from flwr.supercore.task_identity import TaskIdentity

from tests.support.mocks import RUN_ID


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lets tests build Flower Messages outside a run (flwr reads these ids)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", RUN_ID)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
