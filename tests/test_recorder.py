"""The server's per-round recorder, driven by a real strategy over the in-process FakeGrid."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Error, Message, MessageType, MetricRecord, RecordDict

from fedapp.config import FedConfig, parse_config
from fedapp.model.build import build_diffusion, build_model
from fedapp.protocol.comm import CommLedger
from fedapp.protocol.records import model_to_record
from fedapp.runs.rundir import RunDir, read_jsonl
from server_app.metering import MeteredGrid
from server_app.recorder import RoundRecorder
from strategies import build_strategy
from tests.support.markers import needs_fmnist
from tests.support.mocks import FakeGrid

pytestmark = pytest.mark.usefixtures("task_identity")


def tiny_config(tmp_path: Path, **extra: object) -> FedConfig:
    return parse_config({**{
        "model.dim": 8, "model.dim-mults": "1,2", "train.rounds": 2, "data.max-train-examples": 200, "eval.every": 2,
        "eval.num-samples": 4, "eval.sampler-steps": 4, "eval.metric-samples": 0, "eval.fid": "off",
        "output.dir": str(tmp_path),
        "output.name": "rec", "output.progress": False,
    }, **extra})


def echo_client(msg: Message) -> Message:
    node = msg.metadata.dst_node_id
    metrics = {"num-examples": node, "partition-id": node, "num-partitions": 2}
    if msg.metadata.message_type == MessageType.TRAIN:
        content = RecordDict({"arrays": msg.content["arrays"],
                              "metrics": MetricRecord({**metrics, "train-loss": 0.1 * node})})
    else:
        content = RecordDict({"metrics": MetricRecord({**metrics, "eval-loss": 0.2})})
    return Message(content, reply_to=msg)


def run(tmp_path: Path, respond, **extra: object) -> tuple[RunDir, RoundRecorder]:  # type: ignore[no-untyped-def]
    cfg = tiny_config(tmp_path, **extra)
    run_dir = RunDir.create(cfg)
    model = build_model(cfg, seed=0)
    ledger = CommLedger()
    grid = MeteredGrid(FakeGrid([1, 3], respond), ledger)
    recorder = RoundRecorder(cfg, run_dir, model, build_diffusion(cfg), grid, ledger)
    build_strategy(cfg).start(grid=grid, initial_arrays=model_to_record(model), num_rounds=2,
                              evaluate_fn=recorder)
    return run_dir, recorder


def test_each_round_writes_a_row_a_checkpoint_and_samples_on_eval_rounds(tmp_path: Path) -> None:
    run_dir, _ = run(tmp_path, echo_client)
    rows = read_jsonl(run_dir.metrics_path)
    assert [r["round"] for r in rows] == [1, 2]
    # example-weighted: (1*0.1 + 3*0.3) / 4; identifiers are not averaged into metrics
    assert rows[0]["train"]["train-loss"] == pytest.approx(0.25)
    assert "partition-id" not in rows[0]["train"] and rows[0]["evaluate"]["eval-loss"] == pytest.approx(0.2)
    assert "samples" not in rows[0] and (run_dir.path / rows[1]["samples"]).stat().st_size > 0
    assert run_dir.checkpoint_path(1).is_file() and run_dir.checkpoint_path(2).is_file()
    assert {t["server_round"] for t in read_jsonl(run_dir.comm_path)} == {1, 2}
    assert run_dir.label_plot_path.stat().st_size > 0


def test_a_round_in_which_every_client_failed_stops_the_run_with_the_reason(tmp_path: Path) -> None:
    def broken(msg: Message) -> Message:
        return Message(Error(code=0, reason="Traceback ...\nDatasetNotFoundError: install dataset-fashion-mnist"),
                       reply_to=msg)

    with pytest.raises(SystemExit, match="round 1: no client returned a model .*dataset-fashion-mnist"):
        run(tmp_path, broken)
    assert not (tmp_path / "rec" / "checkpoints").exists()


METRICS_ON = {"eval.metric-samples": 8, "eval.fd-cnn": True, "eval.max-reference-examples": 300}


@needs_fmnist
def test_the_server_scores_the_global_model_on_eval_rounds(tmp_path: Path) -> None:
    run_dir, _ = run(tmp_path, echo_client, **METRICS_ON, **{"eval.stats-dir": str(tmp_path / "stats")})
    rows = read_jsonl(run_dir.metrics_path)
    assert "quality" not in rows[0]
    quality = rows[1]["quality"]
    assert quality["fd-cnn"] > 0 and quality["samples"] == 8 and quality["sampler"] == "ddpm-4"
    assert "fid" not in quality and "fd-cnn-std" not in quality


def test_personalized_quality_is_the_clients_mean_and_std(tmp_path: Path) -> None:
    def scoring_client(msg: Message) -> Message:
        reply = echo_client(msg)
        if msg.metadata.message_type == MessageType.EVALUATE:
            reply.content["metrics"]["fd-cnn"] = 10.0 * msg.metadata.dst_node_id
        return reply

    run_dir, _ = run(tmp_path, scoring_client, **{"strategy.name": "udec", "eval.metric-samples": 8})
    quality = read_jsonl(run_dir.metrics_path)[1]["quality"]
    # unweighted over the two clients' own models: 10 and 30
    assert quality["fd-cnn"] == pytest.approx(20.0) and quality["fd-cnn-std"] == pytest.approx(10.0)
    assert quality["clients"] == 2 and quality["samples"] == 8
    assert "fd-cnn" not in read_jsonl(run_dir.metrics_path)[1]["evaluate"]
