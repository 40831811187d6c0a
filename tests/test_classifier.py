"""Tests for fedapp.eval.classifier: the committed weights are what their meta says, the
training is reproducible and works (shown by a short run, not a full retrain), and
broken weights files fail with one clear line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedapp.config import DataConfig
from fedapp.data import sources as datasets
from fedapp.data.sources import DEBIAN_FASHION_MNIST_DIR, ImageData
from fedapp.eval import classifier, classifier_training
from fedapp.eval.classifier import (
    CLASSIFIER_PATH,
    FEATURE_DIM,
    META_KEYS,
    FeatureCNN,
    load_classifier,
    save_classifier,
)
from fedapp.eval.classifier_training import check_classifier, test_accuracy, train_classifier
from tests.support.markers import needs_real_fmnist


@pytest.fixture(autouse=True)
def _threads() -> Iterator[None]:
    """The committed accuracy was measured with 2 threads, and the CLI sets the
    process-wide count; put it back for the other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(classifier.DEFAULT_THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fmnist() -> tuple[ImageData, ImageData]:
    # data.root pins the Debian copy, whatever the user's download cache holds
    cfg = DataConfig(root=str(DEBIAN_FASHION_MNIST_DIR), download=False)
    return datasets.load_split(cfg, "train"), datasets.load_split(cfg, "test")


def _fake(n: int, seed: int = 0) -> ImageData:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=gen)
    return ImageData(images=images, labels=torch.arange(n) % 10, num_classes=10)


def _same_weights(a: FeatureCNN, b: FeatureCNN) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------ committed weights


def test_committed_weights_load_with_meta() -> None:
    assert CLASSIFIER_PATH.stat().st_size <= 3 * 1024 * 1024
    model, meta = load_classifier()
    assert not model.training
    assert set(META_KEYS) <= meta.keys()
    assert meta["dataset"] == "fashion-mnist"
    assert meta["feature_dim"] == FEATURE_DIM
    assert meta["train_examples"] == 60000
    assert meta["command"].startswith("python scripts/train_classifier.py")
    assert isinstance(meta["test_accuracy"], float)


@needs_real_fmnist
def test_committed_accuracy_matches_meta(fmnist: tuple[ImageData, ImageData]) -> None:
    _, test = fmnist
    assert len(test) == 10000
    measured, recorded = check_classifier(CLASSIFIER_PATH, test.images, test.labels)
    assert abs(measured - recorded) < 1e-6
    assert measured >= classifier.MIN_TEST_ACCURACY


# ---------------------------------------------------------------------------- training


@needs_real_fmnist
def test_short_training_is_reproducible_and_learns(fmnist: tuple[ImageData, ImageData]) -> None:
    train, test = fmnist
    images, labels = train.images[:2000], train.labels[:2000]
    kwargs = dict(epochs=1, batch_size=32, lr=2e-3)
    a = train_classifier(images, labels, seed=0, **kwargs)
    b = train_classifier(images, labels, seed=0, **kwargs)
    c = train_classifier(images, labels, seed=1, **kwargs)
    assert _same_weights(a, b)
    assert not _same_weights(a, c)
    assert not a.training
    # 10 classes: chance is 0.1; ~0.68 is typical after these 63 steps
    assert test_accuracy(a, test.images[:2000], test.labels[:2000]) > 0.6


def test_training_leaves_global_rng_alone() -> None:
    data = _fake(64)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_classifier(data.images, data.labels, epochs=1, seed=0, batch_size=32)
    assert torch.equal(torch.rand(3), expected)


def test_training_rejects_bad_input() -> None:
    data = _fake(8)
    with pytest.raises(ValueError, match="uint8"):
        train_classifier(data.images.float(), data.labels, epochs=1, seed=0)
    with pytest.raises(ValueError, match="labels"):
        train_classifier(data.images, data.labels[:4], epochs=1, seed=0)


# ---------------------------------------------------------------------------- features


def test_features_shape_and_mode_independence() -> None:
    model, _ = load_classifier()
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        model.eval()
        feats_eval, logits_eval = model.features(x), model(x)
        model.train()
        feats_train, logits_train = model.features(x), model(x)
    assert feats_eval.shape == (6, FEATURE_DIM)
    assert torch.isfinite(feats_eval).all() and (feats_eval >= 0).all()
    assert torch.equal(feats_eval, feats_train)  # dropout comes after the features
    assert logits_eval.shape == (6, 10)
    assert not torch.equal(logits_eval, logits_train)  # ...but before the head
    with pytest.raises(ValueError, match="28, 28"):
        model.features(torch.zeros(2, 3, 28, 28))


# ------------------------------------------------------------------------ save / load


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = FeatureCNN()
    path = tmp_path / "sub" / "cnn.pt"
    meta = {"feature_dim": FEATURE_DIM, "test_accuracy": 0.5, "nested": {"a": [1, 2.0, "x", True]}}
    save_classifier(model, path, meta)
    loaded, loaded_meta = load_classifier(path)
    assert _same_weights(model, loaded)
    assert loaded_meta == meta
    assert [p.name for p in path.parent.iterdir()] == ["cnn.pt"]  # no temp file left
    with pytest.raises(TypeError, match="meta"):
        save_classifier(model, tmp_path / "bad.pt", {"path": Path("x")})
    assert not (tmp_path / "bad.pt").exists()


def _assert_one_line(exc: pytest.ExceptionInfo[BaseException], path: Path) -> None:
    message = str(exc.value)
    assert "\n" not in message
    assert str(path) in message
    assert "scripts/train_classifier.py" in message


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError) as exc:
        load_classifier(path)
    _assert_one_line(exc, path)


@pytest.mark.parametrize("kind", ["garbage", "other-dict", "pickle", "other-net", "feature-dim"])
def test_load_non_classifier_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.pt"
    if kind == "garbage":
        path.write_bytes(b"not a checkpoint\n")
    elif kind == "other-dict":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "pickle":
        torch.save({"state_dict": {}, "meta": {"p": Path("x")}}, path)  # refused by weights_only
    elif kind == "other-net":
        torch.save({"state_dict": torch.nn.Linear(2, 2).state_dict(),
                    "meta": {"feature_dim": FEATURE_DIM}}, path)
    else:
        torch.save({"state_dict": FeatureCNN().state_dict(), "meta": {"feature_dim": 64}}, path)
    with pytest.raises(ValueError) as exc:
        load_classifier(path)
    _assert_one_line(exc, path)


# --------------------------------------------------------------------------------- CLI


def test_cli_trains_and_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """The script's whole path on fake data: train, save with meta, then --check."""
    splits = {"train": _fake(96, seed=1), "test": _fake(40, seed=2)}
    monkeypatch.setattr(datasets, "load_split", lambda cfg, split: splits[split])
    out = tmp_path / "cnn.pt"
    argv = ["--epochs", "1", "--seed", "3", "--batch-size", "32", "--out", str(out), "--no-progress"]
    assert classifier_training.main(argv) == 0
    assert "test accuracy 0." in capsys.readouterr().out
    model, meta = load_classifier(out)
    assert set(META_KEYS) <= meta.keys()
    assert meta["train_examples"] == 96 and meta["epochs"] == 1 and meta["seed"] == 3
    assert meta["command"] == "python scripts/train_classifier.py " + " ".join(argv)
    assert meta["test_accuracy"] == test_accuracy(model, splits["test"].images, splits["test"].labels)

    # the recorded accuracy is reproduced, but random data is far below the bar
    assert classifier_training.main(["--check", "--out", str(out)]) == 1
    assert "below" in capsys.readouterr().err

    # a meta that lies about the accuracy is caught
    save_classifier(model, out, {**meta, "test_accuracy": 0.95})
    assert classifier_training.main(["--check", "--out", str(out)]) == 1
    assert "differs" in capsys.readouterr().err
