"""ClientApp: local DDPM training and held-out denoising loss on this node's partition."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedapp.builders import build_diffusion, build_model
from fedapp.config import FedConfig, parse_config
from fedapp.local_data import LocalData, local_data
from fedapp.methods import ALL_PARTS, is_personalized, parts_keys, private_parts
from fedapp.node_state import load_node_model, node_dir, save_node_model, state_root
from fedapp.records import load_record, model_to_record
from fedapp.training import denoising_loss, pick_device, train_local
from fedapp.unet import UNet, unet_parts

if TYPE_CHECKING:
    from fedapp.quality import QualityMeter

app = ClientApp()


def _node_job(context: Context) -> tuple[FedConfig, int, int, LocalData]:
    cfg = parse_config(context.run_config)
    pid, num = node_partition(context.node_config, cfg.data.num_partitions)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    return cfg, pid, num, local_data(cfg.data, cfg.seed, pid, num)


def node_partition(node_config: Mapping[str, object], configured: int) -> tuple[int, int]:
    """This node's (partition-id, num-partitions); ``data.num-partitions`` fills in a missing count."""
    if "partition-id" not in node_config:
        raise KeyError(
            "node config lacks 'partition-id': start the SuperNode with "
            "--node-config 'partition-id=<i> num-partitions=<n>'"
        )
    pid = int(node_config["partition-id"])  # type: ignore[call-overload]
    given = int(node_config.get("num-partitions", 0))  # type: ignore[call-overload]
    if given and configured and given != configured:
        raise ValueError(
            f"node config num-partitions = {given} but data.num-partitions = {configured}; make them agree"
        )
    num = given or configured
    if not num:
        raise KeyError("num-partitions is set neither in the node config nor in data.num-partitions")
    return pid, num


def report_parts(config: Mapping[str, object]) -> tuple[str, ...]:
    """The parts the server asked for (all of them when it names none, as Full does)."""
    raw = str(config.get("report-parts", "") or "")
    parts = tuple(p for p in raw.split(",") if p) or ALL_PARTS
    unknown = [p for p in parts if p not in ALL_PARTS]
    if unknown:
        raise ValueError(f"server asked for unknown UNet parts {unknown}; known: {', '.join(ALL_PARTS)}")
    return parts


def personal_model(cfg: FedConfig, msg: Message, context: Context) -> tuple[UNet, Path]:
    """The global arrays received, with this node's own saved parts where it keeps private ones.

    Once a node has trained, its private parts come from its disk even if the server sends
    them (as it does again after a lost reply), so they are never reset to the server's copy.
    """
    model = build_model(cfg)
    incoming = msg.content["arrays"]
    directory = node_dir(state_root(cfg.train.node_state_dir), context.run_id, context.node_id)
    own = set(model.state_dict())
    missing = own - set(incoming.keys())
    keep = set(parts_keys(private_parts(cfg.strategy.name), unet_parts(model)))
    saved = load_node_model(directory) if (missing or keep) else None
    if missing and saved is None:
        raise RuntimeError(
            f"node {context.node_id} received {len(incoming)} of {len(own)} arrays "
            f"but has no saved model of its own in {directory}"
        )
    load_record(model, incoming, strict=not missing)
    if saved is not None:
        take = missing | keep
        model.load_state_dict({k: v for k, v in saved["model"].items() if k in take}, strict=False)
    return model, directory


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, pid, num, data = _node_job(context)
    server_round = int(msg.content["config"]["server-round"])
    device = pick_device(cfg.train.device)
    report = report_parts(msg.content["config"])
    model, directory = personal_model(cfg, msg, context)
    report_keys = parts_keys(report, unet_parts(model))
    result = train_local(
        model,
        build_diffusion(cfg),
        data.train.images,
        epochs=cfg.train.local_epochs,
        batch_size=cfg.train.batch_size,
        lr=cfg.train.lr,
        seed=cfg.seed * 1_000_003 + server_round * 1009 + pid,
        device=device,
        max_steps=cfg.train.max_steps_per_round,
        trainable=report_keys if cfg.train.scope == "shared" else None,
        progress=cfg.output.progress,
        desc=f"client {pid} round {server_round}",
    )
    metrics = MetricRecord(
        {
            "num-examples": len(data.train),
            "train-loss": result.loss,
            "train-steps": result.steps,
            "train-seconds": result.seconds,
            "images-per-s": result.images_per_s,
            "partition-id": pid,
            "num-partitions": num,
        }
    )
    if is_personalized(cfg.strategy.name):
        save_node_model(directory, model.state_dict(), pid, server_round)
    arrays = model_to_record(model, keys=report_keys, dtype=cfg.transport.dtype)
    reply = RecordDict({"arrays": arrays, "metrics": metrics})
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, pid, _, data = _node_job(context)
    device = pick_device(cfg.train.device)
    model, _ = personal_model(cfg, msg, context)
    cap = cfg.eval.max_val_examples or len(data.val)
    images = data.val.images[:cap]
    loss = denoising_loss(
        model, build_diffusion(cfg), images,
        batch_size=cfg.eval.batch_size, seed=cfg.seed + 7 * pid, device=device,
    )
    metrics = MetricRecord({"num-examples": len(images), "eval-loss": loss})
    server_round = int(msg.content["config"].get("server-round", 0))
    if is_personalized(cfg.strategy.name) and cfg.eval.is_eval_round(server_round, cfg.train.rounds):
        meter = quality_meter(cfg, device)
        if meter.enabled:
            scores, _ = meter.measure(model, build_diffusion(cfg))
            metrics.update(scores)  # the server reports their mean ± std over clients
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@lru_cache(maxsize=2)
def quality_meter(cfg: FedConfig, device: torch.device) -> QualityMeter:
    """One per process, so a ClientApp that serves many rounds loads its feature networks once.

    Imported here: a deployed node starts a process per message, and only a personalized
    client's evaluation on an eval round needs pytorch-fid and scipy.
    """
    from fedapp.quality import QualityMeter
    return QualityMeter(cfg, device)
