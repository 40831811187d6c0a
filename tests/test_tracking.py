"""Live tracking: the TensorBoard event files, read back, hold the values metrics.jsonl holds, each round once."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Message, MessageType
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedapp.config import parse_config
from fedapp.eval.grid import save_grid
from fedapp.model.build import build_diffusion, build_model
from fedapp.protocol.comm import CommLedger
from fedapp.protocol.records import model_to_record
from fedapp.runs.rundir import RunDir, read_jsonl
from fedapp.runs.tracking import SERVER, TRACKING_DIR, Tracker, client_dir, comm_scalars, row_scalars
from server_app.metering import MeteredGrid
from server_app.recorder import RoundRecorder
from strategies import build_strategy
from tests.support.mocks import FakeGrid
from tests.test_recorder import echo_client, tiny_config


def comm(rnd: int) -> dict[str, Any]:
    """A row's comm entry as CommLedger.round_summary writes it: per message type, then per client."""
    train = {"down_wire": 1000 + rnd, "up_wire": 500, "down_bytes": 900, "up_bytes": 450}
    evaluate = {"down_wire": 100, "up_wire": 7, "down_bytes": 90, "up_bytes": 0}
    return {"evaluate": {"round": evaluate, "cumulative": {k: v * rnd for k, v in evaluate.items()}},
            "train": {"round": train, "cumulative": {k: v * rnd for k, v in train.items()}},
            "per_client": {"101": train}}


def row(run: RunDir, rnd: int, loss: float = 0.5) -> dict[str, Any]:
    """A ULatDec-like row with every part the tracker reads, its grids written beside it."""
    grid = run.samples_path(rnd)
    save_grid(torch.linspace(-1, 1, 4 * 3 * 8 * 8).reshape(4, 3, 8, 8), grid)
    client_grid = grid.with_name(f"{grid.stem}-client-0.png")
    save_grid(torch.zeros(2, 1, 8, 8), client_grid)
    return {
        "round": rnd, "round_s": 1.5 * rnd, "wall_s": 2.0 * rnd,
        "train": {"train-loss": loss / rnd, "train-steps": 4.0, "images-per-s": 120.25},
        "evaluate": {"eval-loss": loss / rnd + 0.01, "eval-loss-std": 0.002, "clients": 2.0},
        "comm": comm(rnd),
        "quality": {"fd-cnn": 400.0 / rnd, "fd-cnn-std": 12.5, "fd-cnn-precision": 0.25, "fd-cnn-recall": 0.75,
                    "fid": 90.0 / rnd, "clients": 2.0, "samples": 256, "sampler": "ddpm-50",
                    "anchors": {"fd-cnn": {"noise": 1282.0, "real": 24.9}, "fid": {"noise": 400.0, "real": 3.0}}},
        "per_client": {"0": {"train": {"train-loss": 0.4 / rnd}, "evaluate": {"eval-loss": 0.45, "fd-cnn": 380.0}},
                       "1": {"train": {"train-loss": 0.6 / rnd}, "evaluate": {"eval-loss": 0.55, "fd-cnn": 420.0}}},
        "samples": str(grid.relative_to(run.path)),
        "client_samples": {"0": str(client_grid.relative_to(run.path))},
    }


def log_rows(run: RunDir, rows: list[dict[str, Any]], tracker: Tracker) -> None:
    """What close_round does: the row to metrics.jsonl, then to the tracker."""
    for r in rows:
        run.append_jsonl(run.metrics_path, r)
        tracker.write(r)


def events(path: Path) -> EventAccumulator:
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture
def run(tmp_path: Path) -> RunDir:
    path = tmp_path / "run"
    path.mkdir()
    return RunDir(path)


def test_the_event_files_hold_the_rows_of_metrics_jsonl(run: RunDir) -> None:
    tracker = Tracker(run.path)
    log_rows(run, [row(run, 1), row(run, 2)], tracker)
    tracker.close()
    logged = read_jsonl(run.metrics_path)
    server = scalars(events(run.path / TRACKING_DIR / SERVER))

    def series(tag: str) -> list[tuple[int, float]]:
        return [(step, pytest.approx(value, rel=1e-6)) for step, value in server[tag]]  # stored as float32

    for tag, pick in {"loss/train": lambda r: r["train"]["train-loss"],
                      "loss/eval": lambda r: r["evaluate"]["eval-loss"],
                      "train/images-per-s": lambda r: r["train"]["images-per-s"],
                      "evaluate/eval-loss-std": lambda r: r["evaluate"]["eval-loss-std"],
                      "quality/fd-cnn": lambda r: r["quality"]["fd-cnn"],
                      "quality/fd-cnn-std": lambda r: r["quality"]["fd-cnn-std"],
                      "quality/fd-cnn-precision": lambda r: r["quality"]["fd-cnn-precision"],
                      "quality/fd-cnn-recall": lambda r: r["quality"]["fd-cnn-recall"],
                      "quality/fid": lambda r: r["quality"]["fid"],
                      "quality/fd-cnn-noise": lambda r: r["quality"]["anchors"]["fd-cnn"]["noise"],
                      "quality/fd-cnn-real": lambda r: r["quality"]["anchors"]["fd-cnn"]["real"],
                      "quality/fid-real": lambda r: r["quality"]["anchors"]["fid"]["real"],
                      "time/round-s": lambda r: r["round_s"]}.items():
        assert series(tag) == [(r["round"], pick(r)) for r in logged], tag
    # bytes so far, as the round log counts them: every message type's down and up wire bytes
    assert series("comm/bytes-so-far") == [(r["round"], sum(
        t["cumulative"]["down_wire"] + t["cumulative"]["up_wire"] for k, t in r["comm"].items() if k != "per_client"))
        for r in logged]
    assert series("comm/bytes-per-round")[1] == (2, 1002 + 500 + 107)
    assert "quality/samples" not in server and "quality/clients" not in server  # what a score was measured on

    for pid in ("0", "1"):
        client = scalars(events(run.path / TRACKING_DIR / client_dir(pid)))
        assert client["loss/train"] == [(r["round"], pytest.approx(r["per_client"][pid]["train"]["train-loss"]))
                                        for r in logged]
        assert client["quality/fd-cnn"] == [(r["round"], r["per_client"][pid]["evaluate"]["fd-cnn"]) for r in logged]

    grids = events(run.path / TRACKING_DIR / SERVER).Images("samples")
    assert [(g.step, g.width, g.height) for g in grids] == [(1, 22, 22), (2, 22, 22)]  # 2 x 2 grid, 2 px padding
    assert grids[0].encoded_image_string.startswith(b"\x89PNG")
    assert [g.step for g in events(run.path / TRACKING_DIR / client_dir(0)).Images("samples")] == [1, 2]
    assert events(run.path / TRACKING_DIR / client_dir(1)).Tags()["images"] == []


def test_a_resumed_run_writes_each_round_once_with_the_resumed_values(run: RunDir) -> None:
    first = Tracker(run.path)
    log_rows(run, [row(run, 1), row(run, 2), row(run, 3)], first)  # killed after round 3 ...
    first.close()
    kept = read_jsonl(run.metrics_path)[:2]  # ... and resumed from round 2's checkpoint
    run.rewrite_jsonl(run.metrics_path, kept)
    resumed = Tracker(run.path)
    log_rows(run, [row(run, 3, loss=0.9), row(run, 4, loss=0.9)], resumed)
    resumed.close()

    logged = read_jsonl(run.metrics_path)
    for name in (SERVER, client_dir(0)):
        acc = events(run.path / TRACKING_DIR / name)
        assert [e.step for e in acc.Scalars("loss/train")] == [1, 2, 3, 4]
        assert [e.step for e in acc.Images("samples")] == [1, 2, 3, 4]
    server = scalars(events(run.path / TRACKING_DIR / SERVER))
    assert server["loss/train"] == [(r["round"], pytest.approx(r["train"]["train-loss"])) for r in logged]
    assert server["loss/train"][2][1] == pytest.approx(0.3)  # round 3 as resumed, not as first run
    # the replayed rounds keep their place in time: wall_s apart, as logged
    walls = [e.wall_time for e in events(run.path / TRACKING_DIR / SERVER).Scalars("loss/train")]
    assert [round(b - a, 3) for a, b in zip(walls, walls[1:])] == [2.0, 2.0, 2.0]


def test_tracking_off_writes_nothing(run: RunDir) -> None:
    tracker = Tracker.for_run(run.path, parse_config({"output.tensorboard": False}))
    log_rows(run, [row(run, 1)], tracker)
    assert not (run.path / TRACKING_DIR).exists()
    assert Tracker.for_run(run.path, parse_config({})).enabled  # on by default


def test_a_row_without_quality_comm_or_grids_gives_losses_and_time_only(run: RunDir) -> None:
    tracker = Tracker(run.path)
    tracker.write({"round": 1, "round_s": 1.0, "wall_s": 1.0, "train": {"train-loss": 0.3, "note": "x"},
                   "evaluate": {"eval-loss": math.nan}, "comm": {}})
    tracker.close()
    assert set(scalars(events(run.path / TRACKING_DIR / SERVER))) == {"loss/train", "loss/eval", "time/round-s",
                                                                        "time/wall-s"}
    assert comm_scalars({}) == {} and set(row_scalars({"round": 1})) == {SERVER}


@pytest.mark.usefixtures("task_identity")
def test_the_recorder_tracks_each_client_of_a_personalized_run(tmp_path: Path) -> None:
    """The real recorder over the in-process grid: its rows carry each client's figures, and so do the files."""
    def scoring_client(msg: Message) -> Message:
        reply = echo_client(msg)
        if msg.metadata.message_type == MessageType.EVALUATE:
            reply.content["metrics"]["fd-cnn"] = 10.0 * msg.metadata.dst_node_id
        return reply

    cfg = tiny_config(tmp_path, **{"strategy.name": "udec", "eval.metric-samples": 8})
    run_dir = RunDir.create(cfg)
    model = build_model(cfg, seed=0)
    ledger = CommLedger()
    grid = MeteredGrid(FakeGrid([1, 3], scoring_client), ledger)
    recorder = RoundRecorder(cfg, run_dir, model, build_diffusion(cfg), grid, ledger)
    build_strategy(cfg).start(grid=grid, initial_arrays=model_to_record(model), num_rounds=2, evaluate_fn=recorder)
    recorder.tracker.close()

    rows = read_jsonl(run_dir.metrics_path)
    assert rows[1]["per_client"]["3"] == {"train": {"train-loss": pytest.approx(0.3)},
                                          "evaluate": {"eval-loss": 0.2, "fd-cnn": 30.0}}
    server = scalars(events(run_dir.path / TRACKING_DIR / SERVER))
    assert server["quality/fd-cnn"][-1] == (2, pytest.approx(rows[1]["quality"]["fd-cnn"]))  # the mean, 20
    assert server["comm/bytes-so-far"][-1][1] == pytest.approx(sum(ledger.totals(upto=2)[k] for k in ("down_wire", "up_wire")))
    for pid in ("1", "3"):
        client = scalars(events(run_dir.path / TRACKING_DIR / client_dir(pid)))
        assert client["loss/eval"] == [(1, pytest.approx(0.2)), (2, pytest.approx(0.2))]
        assert client["quality/fd-cnn"] == [(r["round"], r["per_client"][pid]["evaluate"]["fd-cnn"]) for r in rows]
