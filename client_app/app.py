"""ClientApp: local DDPM training and held-out denoising loss on this node's partition."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedapp.builders import build_diffusion, build_model
from fedapp.config import FedConfig, parse_config
from fedapp.local_data import LocalData, local_data
from fedapp.records import load_record, model_to_record
from fedapp.training import denoising_loss, pick_device, train_local

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


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, pid, num, data = _node_job(context)
    server_round = int(msg.content["config"]["server-round"])
    device = pick_device(cfg.train.device)
    model = build_model(cfg)
    load_record(model, msg.content["arrays"])
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
    return Message(RecordDict({"arrays": model_to_record(model), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, pid, _, data = _node_job(context)
    device = pick_device(cfg.train.device)
    model = build_model(cfg)
    load_record(model, msg.content["arrays"])
    cap = cfg.eval.max_val_examples or len(data.val)
    images = data.val.images[:cap]
    loss = denoising_loss(
        model, build_diffusion(cfg), images,
        batch_size=cfg.eval.batch_size, seed=cfg.seed + 7 * pid, device=device,
    )
    metrics = MetricRecord({"num-examples": len(images), "eval-loss": loss, "partition-id": pid})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
