"""scripts/class_mix_study.py reads what `fedapp sample --classes` writes and a run's own metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedapp.data.sources import CLASS_NAMES
from fedapp.eval.classes import class_table
from fedapp.report.runs import load_run
from scripts.class_mix_study import correlation, drawn_counts, mix_indices, scored_models, table_distances

NAMES = CLASS_NAMES["fashion-mnist"]


def _table(drawn: list[int], own: list[int]) -> str:
    """A table as the CLI writes it: the first classes' counts given, the rest 0; an even pool."""
    def counts(first: list[int]) -> np.ndarray:
        return np.array(first + [0] * (len(NAMES) - len(first)))
    return class_table(counts(drawn), NAMES,
                       {"training pool": np.ones(len(NAMES), dtype=np.int64), "client 1 of 2": counts(own)})


def _config(method: str) -> str:
    """What a run's config.toml names at least (``load_run`` refuses less)."""
    return f'seed = 0\n\n[strategy]\nname = "{method}"\n\n[data]\nname = "fashion-mnist"\n\n[train]\nrounds = 2\n'


def _run(root: Path, name: str, fd: list[float]) -> Path:
    run = root / name
    run.mkdir()
    (run / "config.toml").write_text(_config("udec"))
    per_client = {str(c): {"train": {}, "evaluate": {"fd-cnn": v, "fd-cnn-recall": 0.5}} for c, v in enumerate(fd)}
    rows = [{"round": 1, "per_client": {}}, {"round": 2, "per_client": per_client, "quality": {"fd-cnn": 250.0}}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_the_distances_are_read_from_the_cli_table(tmp_path: Path) -> None:
    path = tmp_path / "table.txt"
    path.write_text(_table([4], [0, 3]))  # all one class: 0.9 from an even pool, 1 from a client without it
    assert table_distances(path) == (0.9, 1.0)
    assert drawn_counts(path, NAMES) == (4,) + (0,) * 9
    with pytest.raises(ValueError, match="table.txt: no row for Scarf"):
        drawn_counts(path, (*NAMES, "Scarf"))


def test_real_images_are_drawn_in_the_models_class_mix() -> None:
    labels = torch.arange(10).repeat(40)  # 40 of each of 10 classes
    picked = mix_indices(labels, (3, 1) + (0,) * 8, 40, seed=0)
    assert torch.bincount(labels[picked], minlength=10).tolist() == [30, 10] + [0] * 8
    assert len(set(picked.tolist())) == 40  # no image twice
    assert torch.equal(picked, mix_indices(labels, (3, 1) + (0,) * 8, 40, seed=0))  # seeded
    with pytest.raises(ValueError, match="class 0: 45 images wanted, only 40 there"):
        mix_indices(labels, (9, 1), 50, seed=0)


def test_each_client_model_gets_its_last_round_score_and_its_table(tmp_path: Path) -> None:
    run, classes = _run(tmp_path, "label-skew-udec-s0", [300.0, 200.0]), tmp_path / "classes"
    classes.mkdir()
    (classes / "label-skew-udec-s0-client0.txt").write_text(_table([4], [0, 3]))
    assert scored_models(load_run(run), classes) == []  # client 1 has no table: the run does not count
    (classes / "label-skew-udec-s0-client1.txt").write_text(_table([2, 2], [2, 2]))
    models = scored_models(load_run(run), classes)
    assert [(m.client, m.method, m.fd_cnn, m.recall) for m in models] == [(0, "udec", 300.0, 0.5), (1, "udec", 200.0, 0.5)]
    assert models[1].tvd_own == 0.0 and models[1].tvd_pool == pytest.approx(0.8)
    assert correlation(models)[0] == pytest.approx(1.0)  # the farther from the pool, the worse
    (classes / "label-skew-udec-s0-client1.txt").write_text("class  drawn\n")
    with pytest.raises(ValueError, match="client1.txt: not a `fedapp sample --classes` table"):
        scored_models(load_run(run), classes)


def test_a_global_model_is_one_model_with_no_own_partition(tmp_path: Path) -> None:
    run, classes = tmp_path / "label-skew-full-s1", tmp_path / "classes"
    run.mkdir()
    classes.mkdir()
    (run / "config.toml").write_text(_config("full"))
    rows = [{"round": 2, "quality": {"fd-cnn": 297.5, "fd-cnn-recall": 0.56}}, {"round": 2, "train": {}}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert scored_models(load_run(run), classes) == []
    pool_only = class_table(np.array([2, 2] + [0] * 8), NAMES, {"training pool": np.ones(10, dtype=np.int64)})
    (classes / "label-skew-full-s1.txt").write_text(pool_only)
    [model] = scored_models(load_run(run), classes)
    assert (model.client, model.method, model.fd_cnn, model.recall) == (None, "full", 297.5, 0.56)
    assert (model.tvd_pool, model.tvd_own, model.drawn) == (0.8, None, (2, 2) + (0,) * 8)
    (run / "metrics.jsonl").write_text(json.dumps({"round": 1, "train": {}}) + "\n")
    with pytest.raises(ValueError, match="label-skew-full-s1: no scored round in metrics.jsonl"):
        scored_models(load_run(run), classes)
