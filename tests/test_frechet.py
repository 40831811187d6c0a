"""Fréchet distances, the real-statistics cache, and the Inception weights lookup."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedapp.config import DataConfig, EvalConfig, parse_config
from fedapp.data.sources import load_split
from fedapp.eval import frechet, inception
from fedapp.eval.frechet import (
    CLASS_TVD,
    FD_CNN,
    FID,
    PRECISION,
    RECALL,
    ClassifierFeatures,
    Stats,
    feature_spaces,
    feature_stats,
    frechet_distance,
    reference_stats,
)
from fedapp.eval.inception import (
    FIDWeightsUnavailable,
    InceptionFeatures,
    fid_inception_architecture,
    find_fid_weights,
)
from tests.support.markers import needs_fmnist, needs_real_fmnist


class MeanPool(nn.Module):
    """A stand-in feature space: 4x4 average pooling of 28x28 images -> 49 features."""

    name, dim, ident = "pool", 49, "pool-v1"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool2d(x, 4).flatten(1)


def test_distance_of_a_sample_with_itself_is_zero_and_grows_with_a_shift() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(400, 1, 28, 28, generator=gen) * 2 - 1
    base = feature_stats(MeanPool(), x)
    assert abs(frechet_distance(base, base)) < 1e-6
    distances = [frechet_distance(base, feature_stats(MeanPool(), x + shift)) for shift in (0.05, 0.1, 0.2)]
    assert 0 < distances[0] < distances[1] < distances[2]
    # a pure mean shift of s on d features moves the distance by d * s^2
    assert distances[2] == pytest.approx(49 * 0.2**2, rel=1e-6)


def test_uint8_and_float_inputs_give_the_same_statistics() -> None:
    images = torch.randint(0, 256, (50, 1, 28, 28), dtype=torch.uint8)
    a = feature_stats(MeanPool(), images, batch_size=7)
    b = feature_stats(MeanPool(), images.float() / 127.5 - 1)
    np.testing.assert_allclose(a.mu, b.mu, atol=1e-6)
    np.testing.assert_allclose(a.sigma, b.sigma, atol=1e-6)


def test_non_finite_images_are_named_not_scored() -> None:
    x = torch.zeros(4, 1, 28, 28)
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        feature_stats(MeanPool(), x)


@needs_fmnist
def test_reference_statistics_are_cached_per_split_and_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = DataConfig(name="fashion-mnist")
    first = reference_stats(MeanPool(), data, "test", tmp_path, limit=500)
    files = list(tmp_path.glob("*.npz"))
    assert [f.name for f in files] == ["fashion-mnist-test-n500-28px-pool-pool-v1.npz"]
    assert first.n == 500

    def no_data(*_: object) -> None:
        raise AssertionError("the cache must be used")

    monkeypatch.setattr(frechet, "load_split", no_data)
    again = reference_stats(MeanPool(), data, "test", tmp_path, limit=500)
    np.testing.assert_array_equal(first.sigma, again.sigma)
    monkeypatch.undo()

    other = reference_stats(MeanPool(), data, "train", tmp_path, limit=500)  # another split, another file
    assert len(list(tmp_path.glob("*.npz"))) == 2 and frechet_distance(first, other) > 0


@needs_fmnist
def test_a_corrupt_cache_is_recomputed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = DataConfig(name="fashion-mnist")
    good = reference_stats(MeanPool(), data, "test", tmp_path, limit=300)
    path = next(tmp_path.glob("*.npz"))
    path.write_bytes(b"not an npz")
    with caplog.at_level(logging.WARNING):
        again = reference_stats(MeanPool(), data, "test", tmp_path, limit=300)
    np.testing.assert_allclose(good.mu, again.mu)
    assert any("unreadable statistics cache" in r.getMessage() for r in caplog.records)


@needs_real_fmnist
def test_classifier_distance_separates_real_from_degraded_images() -> None:
    space = ClassifierFeatures()
    real = load_split(DataConfig(name="fashion-mnist"), "test").images
    a, b = feature_stats(space, real[:2000]), feature_stats(space, real[2000:4000])
    noisy = real[2000:4000].float() / 127.5 - 1 + 0.5 * torch.randn(2000, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    c = feature_stats(space, noisy.clamp(-1, 1))
    same, degraded = frechet_distance(a, b), frechet_distance(a, c)
    assert space.name == FD_CNN and a.mu.shape == (space.dim,)
    assert 0 <= same < 0.1 * degraded


# ----------------------------------------------------------------- Inception weights lookup


def test_a_configured_weights_file_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    (hub / "checkpoints" / inception.FID_WEIGHTS_FILE).write_bytes(b"cached")
    mine = tmp_path / "mine.pth"
    mine.write_bytes(b"mine")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    assert find_fid_weights(str(mine)) == mine
    assert find_fid_weights("") == hub / "checkpoints" / inception.FID_WEIGHTS_FILE
    with pytest.raises(FIDWeightsUnavailable, match=r"^eval.fid-weights = '.*nope.pth': no such file$"):
        find_fid_weights(str(tmp_path / "nope.pth"))


def _no_download(*_: object, **__: object) -> None:
    raise AssertionError("must not download when a file is at hand")


def test_the_download_is_last_and_its_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str, str | None]] = []

    def unreachable(url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        calls.append((url, dst, hash_prefix))
        raise OSError("[Errno 101] Network is unreachable\nsecond line")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    with pytest.raises(FIDWeightsUnavailable) as err:
        find_fid_weights("")
    message = str(err.value)
    assert "\n" not in message and "Network is unreachable" in message
    assert "eval.fid-weights" in message and inception.FID_WEIGHTS_FILE in message
    assert calls == [(inception.FID_WEIGHTS_URL, str(tmp_path / "hub" / "checkpoints" / inception.FID_WEIGHTS_FILE),
                      "6726825d")]
    with pytest.raises(FIDWeightsUnavailable, match="downloading is off"):
        find_fid_weights("", download=False)


def test_auto_skips_fid_without_weights_and_required_stops(monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    def nothing(*_: object, **__: object) -> Path:
        raise FIDWeightsUnavailable("no weights here")

    monkeypatch.setattr(frechet, "find_fid_weights", nothing)
    data = DataConfig(name="fashion-mnist")
    with caplog.at_level(logging.WARNING):
        spaces = feature_spaces(EvalConfig(fid="auto"), data)
    assert [s.name for s in spaces] == [FD_CNN]
    assert any("FID skipped" in r.getMessage() and "no weights here" in r.getMessage() for r in caplog.records)
    with pytest.raises(FIDWeightsUnavailable, match="no weights here"):
        feature_spaces(EvalConfig(fid="required"), data)
    assert feature_spaces(EvalConfig(fid="off", fd_cnn=False), data) == []


def test_fd_cnn_is_skipped_for_data_its_classifier_does_not_know(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        spaces = feature_spaces(EvalConfig(fid="off"), DataConfig(name="cifar10"))
    assert spaces == [] and any("fd-cnn skipped" in r.getMessage() for r in caplog.records)


def test_classifier_weights_are_found_outside_the_source_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A Flower app bundle has no .pt files: the app then uses the installed fedapp's copy."""
    from fedapp.eval import classifier

    shipped = classifier.CLASSIFIER_PATH.resolve()
    monkeypatch.setattr(classifier, "CLASSIFIER_PATH", tmp_path / "bundle" / "fedapp" / "assets" / shipped.name)
    assert classifier.find_classifier().resolve() == shipped  # this test environment installs fedapp
    configured = tmp_path / "mine.pt"
    configured.write_bytes(shipped.read_bytes())
    assert classifier.find_classifier(str(configured)) == configured
    with pytest.raises(FileNotFoundError, match=r"^eval.fd-cnn-weights = '/nowhere.pt': no such file$"):
        classifier.find_classifier("/nowhere.pt")

    monkeypatch.setattr(classifier, "installed_copy", lambda *_: None)
    with caplog.at_level(logging.WARNING):
        spaces = feature_spaces(EvalConfig(fid="off"), DataConfig(name="fashion-mnist"))
    assert spaces == []
    message = next(r.getMessage() for r in caplog.records if "fd-cnn skipped" in r.getMessage())
    assert "\n" not in message and "eval.fd-cnn-weights" in message


@pytest.fixture(scope="module")
def test_written_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fid") / "random-inception.pth"
    torch.save(fid_inception_architecture().state_dict(), path)
    return path


def test_wrong_weights_are_refused_in_one_line(tmp_path: Path, test_written_weights: Path) -> None:
    state = torch.load(test_written_weights, weights_only=True)
    state.pop("fc.bias")
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    with pytest.raises(FIDWeightsUnavailable, match=r"broken.pth: not the FID Inception weights") as err:
        InceptionFeatures(broken)
    assert "\n" not in str(err.value)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(FIDWeightsUnavailable, match="not a readable weights file"):
        InceptionFeatures(tmp_path / "junk.pth")


@needs_fmnist
def test_fid_code_path_with_test_written_weights(tmp_path: Path, test_written_weights: Path) -> None:
    """CODE-PATH TEST: Inception with random weights the test wrote itself; the values mean nothing.

    It runs the whole FID pipeline (lookup, loading, 1->3 channels and resizing, statistics,
    cache, distance) as a run would, without the real weights this machine cannot download.
    """
    from fedapp.eval.quality import QualityMeter
    from fedapp.model.build import build_diffusion, build_model

    cfg = parse_config({
        "model.dim": 8, "model.dim-mults": "1,2", "eval.metric-samples": 6, "eval.sampler-steps": 2,
        "eval.fid": "required", "eval.fid-weights": str(test_written_weights),
        "eval.max-reference-examples": 8, "eval.stats-dir": str(tmp_path), "output.progress": False,
    })
    meter = QualityMeter(cfg)
    scores, grid = meter.measure(build_model(cfg, seed=0), build_diffusion(cfg), keep=3)
    assert set(scores) == {FD_CNN, FID, PRECISION, RECALL, CLASS_TVD}
    assert all(np.isfinite(v) and v >= 0 for v in scores.values())
    assert 0 <= scores[PRECISION] <= 1 and 0 <= scores[RECALL] <= 1 and 0 <= scores[CLASS_TVD] <= 1
    assert grid.shape == (3, 1, 28, 28)
    names = sorted(p.name for p in tmp_path.glob("*.npz"))
    assert len(names) == 2 and any("-fid-random-inception.pth-" in n for n in names)
    fid_space = next(s for s in meter.spaces if s.name == FID)
    assert isinstance(fid_space, InceptionFeatures) and fid_space.dim == 2048


def test_stats_dataclass_holds_counts() -> None:
    s = feature_stats(MeanPool(), torch.zeros(3, 1, 28, 28))
    assert isinstance(s, Stats) and s.n == 3 and s.sigma.shape == (49, 49)


def test_the_distance_is_the_same_with_a_scipy_without_sqrtm_disp(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    fa, fb = rng.normal(size=(50, 4)), rng.normal(0.5, 1.2, size=(60, 4))
    a = frechet.Stats(fa.mean(0), np.cov(fa, rowvar=False), 50)
    b = frechet.Stats(fb.mean(0), np.cov(fb, rowvar=False), 60)
    expected = frechet.frechet_distance(a, b)
    real_sqrtm = frechet.linalg.sqrtm

    def sqrtm_without_disp(m: np.ndarray) -> np.ndarray:  # scipy >= 1.18's signature
        return real_sqrtm(m)

    monkeypatch.setattr(frechet.linalg, "sqrtm", sqrtm_without_disp)
    assert frechet.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_a_singular_covariance_scores_without_a_warning() -> None:
    import warnings

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 16)), rng.normal(loc=0.5, size=(8, 16))  # 8 samples in 16 dimensions
    a, b = (frechet.Stats(mu=v.mean(0), sigma=np.cov(v, rowvar=False), n=8) for v in (x, y))
    assert np.linalg.matrix_rank(a.sigma) < 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's deprecation of sqrtm(disp) and its LinAlgWarning included
        distance = frechet_distance(a, b)
    assert np.isfinite(distance) and distance > 16 * 0.25 * 0.5  # at least most of |mu_a - mu_b|^2
