"""``fedapp sample --classes``: the FD-CNN classifier's class counts of a model's samples
(fedapp.eval.classes), beside the class shares of the data the model learned from."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fedapp.cli import main
from fedapp.config import DataConfig, parse_config
from fedapp.data import sources
from fedapp.data.share import local_data, training_pool
from fedapp.data.sources import CLASS_NAMES, DEBIAN_FASHION_MNIST_DIR
from fedapp.eval.classes import class_counts, class_table, counts_of_features, total_variation
from fedapp.eval.classifier import load_classifier
from fedapp.eval.frechet import CLASS_TVD, FD_CNN, ClassifierFeatures, features
from fedapp.eval.quality import QualityMeter
from fedapp.model.build import build_model
from fedapp.runs.checkpoint import save_checkpoint
from tests.support.markers import needs_fmnist, needs_real_fmnist

NAMES = CLASS_NAMES["fashion-mnist"]


@needs_real_fmnist
def test_class_counts_put_real_images_in_their_class() -> None:
    test = sources.load_split(DataConfig(root=str(DEBIAN_FASHION_MNIST_DIR), download=False), "test")
    net, meta = load_classifier()
    for label in range(10):
        images = test.images[test.labels == label][:100]
        counts = class_counts(net, images, batch_size=64)
        assert counts.dtype == np.int64 and counts.shape == (10,) and counts.sum() == 100
        assert counts[label] >= 70, (NAMES[label], counts.tolist())  # the classifier is 92 % right overall
    mixed = test.images[:300]
    as_uint8 = class_counts(net, mixed)
    as_float = class_counts(net, mixed.to(torch.float32) / 127.5 - 1.0)
    assert as_uint8.tolist() == as_float.tolist()  # the model range and uint8 are read alike
    right = np.bincount(test.labels[:300].numpy(), minlength=10)
    assert 0.5 * np.abs(as_uint8 - right).sum() <= 300 * (1 - meta["test_accuracy"]) + 15
    assert class_counts(net, torch.zeros(0, 1, 28, 28, dtype=torch.uint8)).tolist() == [0] * 10
    # an evaluation classifies the FD-CNN features it already has, and gets the same counts
    assert counts_of_features(net, features(ClassifierFeatures(), mixed)).tolist() == as_uint8.tolist()


def test_total_variation_is_half_the_l1_distance_of_the_shares() -> None:
    assert total_variation(np.array([6, 2, 2]), np.array([30, 30, 30])) == pytest.approx((4 / 15 + 2 / 15 + 2 / 15) / 2)
    assert total_variation(np.array([1, 0]), np.array([0, 7])) == 1.0
    assert total_variation(np.array([3, 1]), np.array([30, 10])) == 0.0  # shares, not counts
    assert total_variation(np.zeros(3), np.array([1, 1, 1])) == pytest.approx(0.5)  # no samples: no shares


@needs_real_fmnist
def test_each_evaluation_scores_the_class_mix_against_the_reference_split(tmp_path: Path) -> None:
    """``fd-cnn-class-tvd`` beside FD-CNN: about 0 for real test images in their own mix, about 0.9
    for images of one class against Fashion-MNIST's even test split."""
    cfg = parse_config({"eval.metric-samples": 300, "eval.fid": "off", "output.progress": False,
                        "eval.stats-dir": str(tmp_path), "eval.max-reference-examples": 2000})
    meter = QualityMeter(cfg)
    test = sources.load_split(cfg.data, "test")
    assert meter.reference_classes.sum() == 2000 and 170 <= meter.reference_classes.min() <= 200
    mixed = meter.score(test.images[:300])
    assert set(mixed) == {FD_CNN, CLASS_TVD, "fd-cnn-precision", "fd-cnn-recall"}
    assert mixed[CLASS_TVD] < 0.12  # sampling (300 of 10 classes) plus the classifier's 8 % errors
    trousers = meter.score(test.images[test.labels == 1][:300])[CLASS_TVD]
    assert 0.8 <= trousers <= 0.9  # 0.9 were every one read as a trouser


def test_class_table_gives_each_share_and_the_distance() -> None:
    counts = np.array([6, 2, 2, 0, 0, 0, 0, 0, 0, 0])
    table = class_table(counts, NAMES, {"training pool": np.full(10, 30), "client 3's data": counts * 5})
    lines = table.splitlines()
    assert lines[0].split() == ["class", "drawn", "share", "training", "pool", "client", "3's", "data"]
    assert lines[1].split() == ["T-shirt/top", "6", "60.0%", "10.0%", "60.0%"]
    assert lines[2].split() == ["Trouser", "2", "20.0%", "10.0%", "20.0%"]
    assert lines[10].split() == ["Ankle", "boot", "0", "0.0%", "10.0%", "0.0%"]
    assert lines[11].split() == ["total", "10"]
    # (0.5 + 0.1 + 0.1 + 7 * 0.1) / 2 against the even pool; none against the client's own mix
    assert lines[12:] == ["total variation distance to training pool: 0.700",
                          "total variation distance to client 3's data: 0.000"]
    with pytest.raises(ValueError, match="3 class counts for 10 class names"):
        class_table(np.array([1, 2, 3]), NAMES, {})


@pytest.fixture(params=[2, 0], ids=["num-partitions=2", "num-partitions=0"])
def personalized_run(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, DataConfig]:
    """A UDec-like final.pt at Fashion-MNIST's 28 px: a 4-wide UNet, a 10-step chain, two clients'
    own models; with data.num-partitions = 0 the split is one partition per client model."""
    cfg = parse_config({"model.dim": 4, "model.dim-mults": "1", "diffusion.timesteps": 10,
                        "eval.sampler": "ddpm", "eval.sampler-steps": 2, "strategy.name": "udec",
                        "data.max-train-examples": 400, "data.num-partitions": request.param,
                        "data.partitioner": "label-skew", "data.cache": False, "seed": 3})
    clients = {pid: build_model(cfg, seed=10 + pid).state_dict() for pid in (0, 1)}
    path = save_checkpoint(tmp_path / "run" / "final.pt", cfg, 1, build_model(cfg, seed=1), extra={"clients": clients})
    return path, cfg.data


def _shares(out: str, column: int) -> list[float]:
    rows = [line for line in out.splitlines() if line.split() and line.split()[0] in {n.split()[0] for n in NAMES}]
    return [float(re.findall(r"([\d.]+)%", row)[column]) for row in rows]


@needs_fmnist
def test_sample_classes_prints_the_drawn_mix_beside_the_data(personalized_run: tuple[Path, DataConfig],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    path, data = personalized_run
    assert main(["sample", str(path), "--client", "1", "--n", "5", "--classes", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^total\s+5$", out, re.M), out
    drawn = [int(row.split()[-4]) for row in out.splitlines() if "%" in row and not row.startswith("total")]
    assert sum(drawn) == 5
    pool = np.bincount(training_pool(data, 3).labels.numpy(), minlength=10)
    own = np.bincount(local_data(data, 3, 1, 2).train.labels.numpy(), minlength=10)
    assert _shares(out, 1) == pytest.approx((100 * pool / pool.sum()).round(1).tolist())
    assert _shares(out, 2) == pytest.approx((100 * own / own.sum()).round(1).tolist())
    assert "total variation distance to client 1 of 2: " in out
    assert (path.parent / "final-client1-ddpm2-seed0.png").is_file()


def test_sample_classes_refuses_a_run_the_classifier_cannot_read(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cfg = parse_config({"model.dim": 4, "model.dim-mults": "1", "diffusion.timesteps": 10, "data.image-size": 8,
                        "eval.sampler": "ddpm", "eval.sampler-steps": 5})
    path = save_checkpoint(tmp_path / "final.pt", cfg, 1, build_model(cfg, seed=0))
    assert main(["sample", str(path), "--classes", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"fedapp sample: --classes: the FD-CNN classifier knows fashion-mnist at 28 px; {path} "
                   "is fashion-mnist at 8 px")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.pt"]  # refused before drawing anything
