"""The round's summary line and the anchors beside its quality figures."""

from __future__ import annotations

from fedapp.config import parse_config
from fedapp.eval.frechet import FD_CNN
from fedapp.eval.quality import QualityMeter
from fedapp.runs.rows import quality_entry, summary_line
from tests.support.markers import needs_real_fmnist


def test_the_summary_line_gives_losses_quality_with_anchors_bytes_grid_and_time() -> None:
    cfg = parse_config({"eval.metric-samples": 256})
    row = {"round": 3, "round_s": 87.61, "train": {"train-loss": 0.04123}, "evaluate": {"eval-loss": 0.0388},
           "quality": quality_entry(cfg, {FD_CNN: 412.34}, {FD_CNN: {"noise": 1282.06, "real": 24.94}}),
           "samples": "samples/round-003.png"}
    assert summary_line(row, 5, 20_812_345) == (
        "round 3/5 | train-loss 0.0412 | eval-loss 0.0388 | FD-CNN 412.3 (noise 1282.1, real 24.9; "
        "256 ddpm-50 samples) | 20.8 MB moved so far | grid samples/round-003.png | 87.6 s")


def test_a_personalized_score_gives_its_spread_and_a_round_without_quality_stays_short() -> None:
    cfg = parse_config({})
    row = {"round": 2, "round_s": 10.0, "train": {}, "evaluate": {"eval-loss": 0.05},
           "quality": {**quality_entry(cfg, {FD_CNN: 500.0, f"{FD_CNN}-std": 12.25}), "clients": 5.0}}
    assert "FD-CNN 500.0 ± 12.2 over 5 clients (256 ddpm-50 samples)" in summary_line(row, 4)
    row["quality"] |= {"fd-cnn-precision": 0.812, "fd-cnn-recall": 0.5, "fd-cnn-class-tvd": 0.3456}
    assert "samples) | precision 0.81 recall 0.50 | class TVD 0.346 | 10.0 s" in summary_line(row, 4)
    assert summary_line({"round": 1, "round_s": 2.0, "train": {}, "evaluate": {}}, 4) == "round 1/4 | 2.0 s"


def test_collafuse_shows_its_servers_loss_and_no_client_loss_where_clients_trained_nothing() -> None:
    row = {"round": 1, "round_s": 5.0, "train": {"server-train-loss": 0.03163, "server-steps": 1280}, "evaluate": {}}
    assert summary_line(row, 10) == "round 1/10 | server-train-loss 0.0316 | 5.0 s"


@needs_real_fmnist
def test_the_anchors_put_real_images_near_zero_and_noise_far_away(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = parse_config({"eval.metric-samples": 256, "eval.fid": "off", "output.progress": False,
                        "eval.stats-dir": str(tmp_path)})
    anchors = QualityMeter(cfg).anchors[FD_CNN]
    assert set(anchors) == {"noise", "real"}
    assert anchors["real"] < 60 and anchors["noise"] > 800  # docs/RESULTS.md: 19-34 and about 1,282
    assert anchors["noise"] > 20 * anchors["real"]
