"""The runtime caches change how fast a run is, never what it computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedapp.data.share import local_data, pool_partitioner
from fedapp.data.sources import load_split
from fedapp.protocol.records import decode_record
from tests.support.inprocess import run_inprocess
from tests.support.markers import needs_fmnist

pytestmark = [
    pytest.mark.usefixtures("task_identity"),
    needs_fmnist,
]


def _fresh_process_caches() -> None:
    for cached in (local_data, pool_partitioner, load_split):
        cached.cache_clear()


def test_same_seed_gives_the_same_final_weights_with_and_without_the_partition_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDAPP_DATA_DIR", str(tmp_path / "data-cache"))
    finals = {}
    for name, cache in (("uncached", False), ("writes", True), ("reads", True)):
        _fresh_process_caches()
        _, _, final = run_inprocess(tmp_path / name, nodes=2, **{"data.cache": cache, "train.rounds": 2,
                                                                  "strategy.name": "udec"})
        finals[name] = decode_record(final)
        files = sorted((tmp_path / "data-cache" / "partitions").glob("*.pt"))
        assert len(files) == (0 if name == "uncached" else 2)
    _fresh_process_caches()
    for name in ("writes", "reads"):
        assert finals[name].keys() == finals["uncached"].keys()
        assert all(torch.equal(finals[name][k], v) for k, v in finals["uncached"].items()), name
