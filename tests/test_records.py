"""Model <-> ArrayRecord conversion, checkpoints and the run directory."""

from __future__ import annotations

import os
import pickle
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedapp.config import FedConfig, parse_config
from fedapp.model.build import build_model
from fedapp.model.unet import UNet
from fedapp.protocol.records import arrays_size, content_size, load_record, model_to_record, state_numel
from fedapp.runs.checkpoint import atomic_torch_save, load_checkpoint, save_checkpoint
from fedapp.runs.rundir import RunDir, read_jsonl


def tiny_unet(seed: int) -> UNet:
    torch.manual_seed(seed)
    return UNet(dim=8, dim_mults=(1, 2), channels=1)


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- records ------------------------------------------------------------------------------
def test_model_to_record_and_back_is_bit_identical() -> None:
    src, dst = tiny_unet(0), tiny_unet(1)
    assert not same_state(src.state_dict(), dst.state_dict())
    rec = model_to_record(src)
    assert list(rec.keys()) == list(src.state_dict().keys())
    load_record(dst, rec)
    assert same_state(dst.state_dict(), src.state_dict())


def test_record_holds_a_copy_of_the_weights() -> None:
    model = tiny_unet(0)
    before = snapshot(model)
    rec = model_to_record(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    restored = tiny_unet(2)
    load_record(restored, rec)
    assert same_state(restored.state_dict(), before)


def test_record_of_a_subset_of_keys() -> None:
    src, dst = tiny_unet(0), tiny_unet(1)
    keys = [k for k in src.state_dict() if k.startswith("init_conv.")]
    assert keys == ["init_conv.weight", "init_conv.bias"]
    rec = model_to_record(src, keys=keys)
    assert list(rec.keys()) == keys

    before = snapshot(dst)
    load_record(dst, rec, strict=False)
    after = dst.state_dict()
    for key in after:
        expected = src.state_dict()[key] if key in keys else before[key]
        assert torch.equal(after[key], expected), key

    with pytest.raises(KeyError, match="missing keys"):
        load_record(tiny_unet(1), rec)  # strict: the other keys are missing


def test_load_record_rejects_an_unknown_key_and_leaves_the_model_alone() -> None:
    model = tiny_unet(1)
    before = snapshot(model)
    rec = model_to_record(tiny_unet(0))
    rec["not.a.param"] = Array(np.zeros(3, np.float32))
    with pytest.raises(KeyError, match="not.a.param"):
        load_record(model, rec)
    with pytest.raises(KeyError, match="not.a.param"):
        load_record(model, rec, strict=False)
    assert same_state(model.state_dict(), before)


def test_load_record_rejects_a_wrong_shape_naming_the_key() -> None:
    model = tiny_unet(1)
    before = snapshot(model)
    rec = model_to_record(tiny_unet(0))
    rec["init_conv.bias"] = Array(np.zeros(7, np.float32))  # model has 4 (= 8 // 3 * 2)
    with pytest.raises(ValueError, match=r"'init_conv\.bias'.*\(7,\).*\(4,\)"):
        load_record(model, rec)
    assert same_state(model.state_dict(), before)


def test_arrays_size_counts_values_exactly() -> None:
    rec = ArrayRecord({
        "a": Array(np.zeros((2, 3), np.float32)),
        "b": Array(np.zeros(4, np.float64)),
        "c": Array(np.array(1.5, np.float32)),
        "d": Array(np.zeros((0, 9), np.float32)),
    })
    params, nbytes = arrays_size(rec)
    assert params == 6 + 4 + 1 + 0
    assert nbytes == sum(len(a.data) for a in rec.values())
    assert nbytes > 6 * 4 + 4 * 8 + 4
    assert arrays_size(ArrayRecord()) == (0, 0)

    model = tiny_unet(0)
    unet_params, unet_bytes = arrays_size(model_to_record(model))
    assert unet_params == state_numel(model.state_dict()) == sum(p.numel() for p in model.parameters())
    assert unet_bytes > 4 * unet_params

    content = RecordDict({"x": rec, "y": model_to_record(model), "m": MetricRecord({"n": 3})})
    assert content_size(content) == (params + unet_params, nbytes + unet_bytes)
    assert content_size(RecordDict({"m": MetricRecord({"n": 3})})) == (0, 0)


# -- checkpoints --------------------------------------------------------------------------
@pytest.fixture
def cfg() -> FedConfig:
    return parse_config({"model.dim": 8, "model.dim-mults": "1,2", "seed": 3, "train.rounds": 7})


def perturbed_model(cfg: FedConfig, shift: float) -> torch.nn.Module:
    model = build_model(cfg, seed=cfg.seed)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(shift * (i + 1))
    return model


def test_checkpoint_round_trip(tmp_path: Path, cfg: FedConfig) -> None:
    model = perturbed_model(cfg, 0.01)
    extra = {"comm": [{"server_round": 1, "params": 10}], "metrics": [{"round": 1, "loss": 0.25}]}
    path = save_checkpoint(tmp_path / "ckpt" / "round-007.pt", cfg, 7, model, extra=extra)
    assert path == tmp_path / "ckpt" / "round-007.pt" and path.is_file()

    loaded, loaded_cfg, payload = load_checkpoint(path)
    assert type(loaded) is type(model)
    assert same_state(loaded.state_dict(), model.state_dict())
    assert loaded_cfg.flat() == cfg.flat()
    assert loaded_cfg == cfg
    assert payload["round"] == 7
    assert payload["extra"] == extra
    assert payload["format"] == 1


def test_checkpoint_without_extra(tmp_path: Path, cfg: FedConfig) -> None:
    path = save_checkpoint(tmp_path / "c.pt", cfg, 0, build_model(cfg, seed=0))
    assert load_checkpoint(path)[2]["extra"] == {}


def test_truncated_checkpoint_is_a_one_line_value_error(tmp_path: Path, cfg: FedConfig) -> None:
    data = save_checkpoint(tmp_path / "good.pt", cfg, 1, build_model(cfg, seed=0)).read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as err:
        load_checkpoint(bad)
    message = str(err.value)
    assert str(bad) in message
    assert "\n" not in message


def test_foreign_file_is_a_one_line_value_error(tmp_path: Path) -> None:
    bad = tmp_path / "foreign.pt"
    bad.write_bytes(b"garbage" * 10)  # not a zip: torch falls back to unpickling
    with pytest.raises(ValueError) as err:
        load_checkpoint(bad)
    assert str(bad) in str(err.value)
    assert "\n" not in str(err.value)


def test_checkpoint_whose_weights_do_not_fit_its_config(tmp_path: Path) -> None:
    cfg = parse_config({"model.dim": 8, "model.dim-mults": "1,2"})
    path = save_checkpoint(tmp_path / "c.pt", cfg, 1, UNet(8, (1, 2), 1))
    payload = torch.load(path, weights_only=True)
    payload["config"]["model.dim"] = 12  # the weights are for dim 8
    torch.save(payload, path)
    with pytest.raises(ValueError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_checkpoint_permissions_follow_the_umask(tmp_path: Path) -> None:
    import os
    cfg = parse_config({"model.dim": 8, "model.dim-mults": "1,2"})
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "c.pt", cfg, 1, UNet(8, (1, 2), 1))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_torch_file_that_is_not_a_fedapp_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"state": {"w": torch.zeros(2)}}, path)
    with pytest.raises(ValueError, match="not a fedapp checkpoint of format 1"):
        load_checkpoint(path)


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "adir.pt").mkdir()
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "adir.pt")


def test_save_is_atomic_and_overwrites(tmp_path: Path, cfg: FedConfig) -> None:
    path = tmp_path / "latest.pt"
    save_checkpoint(path, cfg, 1, perturbed_model(cfg, 0.0))
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]

    second = perturbed_model(cfg, 0.5)
    save_checkpoint(path, cfg, 2, second)
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]  # replaced, no *.tmp left
    loaded, _, payload = load_checkpoint(path)
    assert payload["round"] == 2
    assert same_state(loaded.state_dict(), second.state_dict())


def test_failed_save_keeps_the_old_file_and_leaves_no_tmp(tmp_path: Path, cfg: FedConfig) -> None:
    path = save_checkpoint(tmp_path / "latest.pt", cfg, 1, build_model(cfg, seed=0))
    before = path.read_bytes()
    with pytest.raises((pickle.PicklingError, AttributeError)):
        atomic_torch_save({"unpicklable": lambda: None}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))


# -- run directory ------------------------------------------------------------------------
def test_run_dir_is_never_reused(tmp_path: Path) -> None:
    cfg = parse_config({"output.name": "exp", "model.dim": 8, "model.dim-mults": "1,2"})
    first = RunDir.create(cfg, base=tmp_path)
    second = RunDir.create(cfg, base=tmp_path)
    assert first.path != second.path
    assert first.path.is_dir() and second.path.is_dir()
    assert first.path.parent == second.path.parent == tmp_path.resolve()
    assert first.path.name == "exp"
    assert second.path.name.startswith("exp")
    (first.path / "marker").write_text("x")
    third = RunDir.create(cfg, base=tmp_path)
    assert third.path not in (first.path, second.path)
    assert not (third.path / "marker").exists()


def test_run_dir_config_parses_back(tmp_path: Path) -> None:
    cfg = parse_config({
        "seed": 5, "model.dim": 8, "model.dim-mults": "1,2", "diffusion.beta-end": 0.03,
        "diffusion.loss": "mse", "data.root": "/data/x", "data.partitioner": "label-skew",
        "train.lr": 2.5e-4, "strategy.min-nodes": 3, "strategy.round-timeout": 12.5,
        "eval.every": 0, "output.name": "exp", "output.progress": False,
    })
    run = RunDir.create(cfg, base=tmp_path)
    with run.config_path.open("rb") as handle:
        tree = tomllib.load(handle)
    assert parse_config(tree) == cfg
    assert parse_config(tree).flat() == cfg.flat()


def test_jsonl_round_trip(tmp_path: Path) -> None:
    run = RunDir.create(parse_config({"output.name": "j"}), base=tmp_path)
    rows = [{"round": 1, "loss": 0.5, "comm": {"train": [1, 2]}}, {"round": 2, "loss": None}, {"round": 3}]
    run.append_jsonl(run.metrics_path, rows[0])
    run.append_jsonl(run.metrics_path, rows[1:])
    run.append_jsonl(run.metrics_path, [])
    assert read_jsonl(run.metrics_path) == rows
    assert len(run.metrics_path.read_text().splitlines()) == 3
