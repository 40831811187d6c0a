"""The centralized baseline: the clients' data pooled in one process, same model and epochs.

``strategy.name = "centralized"`` runs this instead of a federation, so every comparison
has its baseline from the same code and config. One "round" is ``train.local-epochs``
epochs over the union of the clients' training parts, exactly what a single client
holding all the data would do (the papers' K = 1): with the same recipe (a fresh Adam per
round, or one that persists, as ``train.optimizer-state`` says; an EMA over every step,
which samples and evaluations use). It is evaluated on the union of the clients' held-out parts.

Every round's checkpoint holds what the next round starts from (the trained weights, the EMA,
the Adam state, the rows), so ``fedapp resume`` continues an interrupted baseline to the same
result, as it does a federation.
"""

from __future__ import annotations

import copy
import time
from logging import INFO

import torch

from fedapp.config import FedConfig
from fedapp.data.share import local_data
from fedapp.eval.grid import save_grid
from fedapp.eval.quality import QualityMeter
from fedapp.log import log
from fedapp.model.build import build_diffusion, build_model
from fedapp.protocol.keys import train_seed
from fedapp.runs.checkpoint import save_checkpoint
from fedapp.runs.resume import ResumePoint, rng_state, set_rng_state
from fedapp.runs.rows import RoundClock, Row, close_round, quality_entry, summary_line
from fedapp.runs.rundir import RunDir
from fedapp.runs.tracking import Tracker
from fedapp.train.ema import ema_state, make_ema
from fedapp.train.loop import denoising_loss, pick_device, train_local
from fedapp.train.optim import Recipe


def pooled_data(cfg: FedConfig, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) uint8 images: the union of every client's parts, as the federation sees them."""
    parts = [local_data(cfg.data, cfg.seed, pid, num_partitions) for pid in range(num_partitions)]
    val_cap = cfg.eval.max_val_examples
    train = torch.cat([p.train.images for p in parts])
    val = torch.cat([p.val.images[:val_cap] if val_cap else p.val.images for p in parts])
    return train, val


def run_centralized(cfg: FedConfig, run: RunDir, num_partitions: int,
                    point: ResumePoint | None = None) -> list[dict[str, object]]:
    """Train, checkpoint and measure round by round into ``run`` (after ``point``'s round); returns the rows."""
    device = pick_device(cfg.train.device)
    model, diffusion = build_model(cfg, seed=cfg.seed), build_diffusion(cfg)
    train, val = pooled_data(cfg, num_partitions)
    log(INFO, "centralized baseline: %d training and %d held-out images pooled from %d partitions",
        len(train), len(val), num_partitions)
    meter = QualityMeter(cfg, device)
    rows: list[Row] = []
    clock = RoundClock()
    tracker = Tracker.for_run(run.path, cfg)
    optimizer: dict[str, object] | None = None
    if point is not None:
        model.load_state_dict(point.model)
        optimizer = point.extra["strategy"].get("optimizer")
        set_rng_state(point.extra["rng"])
        rows = list(point.extra["metrics"])
        run.rewrite_jsonl(run.metrics_path, rows)  # exactly the checkpoint's rounds, each once
        clock.resume(rows)
    ema = make_ema(model, cfg.train, point.ema if point is not None else None)
    averaged = copy.deepcopy(model) if ema is not None else model
    for rnd in range((point.round if point is not None else 0) + 1, cfg.train.rounds + 1):
        result = train_local(
            model, diffusion, train, epochs=cfg.train.local_epochs, batch_size=cfg.train.batch_size,
            recipe=Recipe.from_config(cfg.train, rnd), seed=train_seed(cfg.seed, rnd), device=device,
            max_steps=cfg.train.max_steps_per_round, optimizer=optimizer, ema=ema,
            progress=cfg.output.progress, desc=f"centralized round {rnd}",
        )
        if cfg.train.optimizer_state == "persist":
            optimizer = result.optimizer
        if ema is not None:
            ema.copy_to(averaged.parameters())
        now = time.perf_counter()
        train_metrics = {"train-loss": result.loss, "train-steps": float(result.steps),
                         "train-seconds": result.seconds, "images-per-s": result.images_per_s}
        eval_loss = denoising_loss(averaged, diffusion, val, batch_size=cfg.eval.batch_size, seed=cfg.seed, device=device)
        row = clock.new_row(rnd, now, train=train_metrics, evaluate={"eval-loss": eval_loss}, comm={})
        model.to("cpu")
        if cfg.eval.is_eval_round(rnd, cfg.train.rounds):
            scores, samples = meter.measure(averaged, diffusion, keep=cfg.eval.num_samples)
            if scores:
                row["quality"] = quality_entry(cfg, scores, meter.anchors)
            row["samples"] = str(save_grid(samples, run.samples_path(rnd)).relative_to(run.path))
        kept = ema_state(ema, model) if ema is not None else None
        close_round(run, cfg, model, rows, row, now, tracker=tracker, ema=kept,
                    extra={"comm": [], "strategy": {"optimizer": optimizer}, "rng": rng_state()})
        log(INFO, "centralized %s", summary_line(row, cfg.train.rounds))
        clock.lap()
    save_checkpoint(run.path / "final.pt", cfg, cfg.train.rounds, model, extra={"comm": [], "metrics": rows},
                    ema=ema_state(ema, model) if ema is not None else None)
    return rows
