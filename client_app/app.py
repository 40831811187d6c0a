"""ClientApp: local DDPM training and held-out denoising loss on this node's partition.

FedDiffuse's methods use the default ``train``/``evaluate`` actions; CollaFuse's split
learning uses its own named actions, ``train.collafuse`` and ``evaluate.collafuse``.
"""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.node import (
    AUDIT_FILE,
    audit_denoiser,
    carried_state,
    cut,
    inject_fault,
    node_job,
    node_partition,
    own_model,
    personal_model,
    private_update,
    quality_meter,
    report_parts,
    sample_level_account,
    save_trained,
    upload,
)
from fedapp.data.pixels import to_uint8
from fedapp.eval.disclosure import audit_upload
from fedapp.log import phase
from fedapp.model.build import build_diffusion
from fedapp.model.unet import unet_parts
from fedapp.privacy.dpsgd import SampleLevelDP
from fedapp.protocol.keys import (
    AUDIT_ROUND,
    COLLAFUSE,
    CONFIG,
    IMAGES,
    METRICS,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    PARTITION_ID,
    SAMPLE_SEED,
    SAMPLES,
    SERVER_ROUND,
    SPLIT,
    UPLOAD,
    X_CUT,
    eval_seed,
    train_seed,
    upload_seed,
)
from fedapp.protocol.methods import is_personalized, parts_keys
from fedapp.protocol.packing import packing_mod
from fedapp.protocol.records import (
    decode_array,
    decode_record,
    encode_tensor,
    upload_to_record,
)
from fedapp.runs.node_state import save_node_file
from fedapp.train.collafuse import client_half, client_round
from fedapp.train.loop import denoising_loss, pick_device, train_local
from fedapp.train.optim import Recipe

__all__ = ["app", "node_partition"]

app = ClientApp(mods=[packing_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    phase("train", "start")
    cfg, pid, num, data = node_job(context)
    phase("train", "data ready")
    server_round = int(msg.content[CONFIG][SERVER_ROUND])
    device = pick_device(cfg.train.device)
    report = report_parts(msg.content[CONFIG])
    local = personal_model(cfg, msg, context, pid, upto=server_round - 1)
    model, directory = local.model, local.directory
    personal = is_personalized(cfg.strategy.name)
    optimizer, ema = carried_state(cfg, model, directory, server_round - 1, keeps_ema=personal, own=local.saved)
    report_keys = parts_keys(report, unet_parts(model))
    received = {k: v.detach().clone() for k, v in model.state_dict().items() if k in report_keys}
    dp = SampleLevelDP.for_partition(cfg, len(data.train))
    phase("train", "model ready")
    result = train_local(
        model,
        build_diffusion(cfg),
        data.train.images,
        epochs=cfg.train.local_epochs,
        batch_size=cfg.train.batch_size,
        recipe=Recipe.from_config(cfg.train, server_round),
        seed=train_seed(cfg.seed, server_round, pid),
        device=device,
        max_steps=cfg.train.max_steps_per_round,
        trainable=report_keys if cfg.train.scope == "shared" else None,
        optimizer=optimizer,
        ema=ema,
        dp=dp,
        progress=cfg.output.progress,
        desc=f"client {pid} round {server_round}",
    )
    phase("train", "computed")
    inject_fault(cfg, pid, server_round)
    privacy = private_update(cfg, model, received)
    if dp is not None:
        privacy.update(sample_level_account(cfg, dp, result.steps, directory, pid, server_round))
    metrics = MetricRecord(
        {
            **privacy,
            NUM_EXAMPLES: len(data.train),
            "train-loss": result.loss,
            "train-steps": result.steps,
            "train-seconds": result.seconds,
            "images-per-s": result.images_per_s,
            PARTITION_ID: pid,
            NUM_PARTITIONS: num,
        }
    )
    save_trained(cfg, directory, model, result, ema, pid, server_round, own_model=personal)
    reply = upload(cfg, msg, local, report_keys, pid, server_round, seed=upload_seed(cfg.seed, server_round, pid))
    reply[METRICS] = metrics
    phase("train", "reply ready")
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    phase("evaluate", "start")
    cfg, pid, _, data = node_job(context)
    phase("evaluate", "data ready")
    device = pick_device(cfg.train.device)
    server_round = int(msg.content[CONFIG].get(SERVER_ROUND, 0))  # type: ignore[call-overload]
    model = personal_model(cfg, msg, context, pid, upto=server_round or None, sampling=True).model
    cap = cfg.eval.max_val_examples or len(data.val)
    images = data.val.images[:cap]
    phase("evaluate", "model ready")
    loss = denoising_loss(
        model, build_diffusion(cfg), images,
        batch_size=cfg.eval.batch_size, seed=eval_seed(cfg.seed, pid), device=device,
    )
    metrics = MetricRecord({NUM_EXAMPLES: len(images), "eval-loss": loss})
    if is_personalized(cfg.strategy.name):  # whose own model this scored: the server tracks each client
        metrics[PARTITION_ID] = pid  # an identifier, never averaged (mean_std_over_clients skips it)
    if is_personalized(cfg.strategy.name) and cfg.eval.is_eval_round(server_round, cfg.train.rounds):
        meter = quality_meter(cfg, device)
        if meter.enabled:
            scores, _ = meter.measure(model, build_diffusion(cfg))
            metrics.update(scores)  # the server reports their mean ± std over clients
    phase("evaluate", "computed")
    reply = Message(RecordDict({METRICS: metrics}), reply_to=msg)
    phase("evaluate", "reply ready")
    return reply



# ------------------------------------------------------------------------------------ CollaFuse
@app.train(COLLAFUSE)
def collafuse_train(msg: Message, context: Context) -> Message:
    """Train the own model below the cut; send the server the draws above it (never the images)."""
    cfg, pid, num, data = node_job(context)
    t_cut = cut(cfg, msg)
    server_round = int(msg.content[CONFIG][SERVER_ROUND])
    local = own_model(cfg, msg, context, pid, upto=server_round - 1)
    model, directory = local.model, local.directory
    optimizer, ema = carried_state(cfg, model, directory, server_round - 1, keeps_ema=True, own=local.saved)
    diffusion = build_diffusion(cfg)
    done, upload = client_round(
        model, diffusion, data.train.images, t_cut,
        epochs=cfg.train.local_epochs, batch_size=cfg.train.batch_size, recipe=Recipe.from_config(cfg.train, server_round),
        seed=train_seed(cfg.seed, server_round, pid), device=pick_device(cfg.train.device),
        upload_cap=cfg.collafuse.upload_samples, max_steps=cfg.train.max_steps_per_round,
        optimizer=optimizer, ema=ema,
        progress=cfg.output.progress, desc=f"collafuse client {pid} round {server_round}",
    )
    inject_fault(cfg, pid, server_round)
    save_trained(cfg, directory, model, done.own, ema, pid, server_round, own_model=True)
    record = upload_to_record(upload, cfg.transport.dtype)
    sent = decode_record(record)  # the audit scores exactly what the server receives
    keep = min(cfg.collafuse.audit_samples, len(upload))
    save_node_file(directory, AUDIT_FILE, {"round": server_round, "x0": upload.x0[:keep]})
    metrics = MetricRecord({
        NUM_EXAMPLES: len(data.train),
        **({"train-loss": done.own.loss} if done.own.images else {}),  # at c = 0 it trains nothing
        "train-steps": done.own.steps,
        "train-seconds": done.own.seconds,
        "client-samples": done.own.images,
        "drawn-samples": done.drawn,
        "upload-samples": len(upload),
        PARTITION_ID: pid,
        NUM_PARTITIONS: num,
        **audit_upload(diffusion, sent["x-t"], sent["t"], sent["target"], upload.x0),
    })
    return Message(RecordDict({UPLOAD: record, METRICS: metrics}), reply_to=msg)


@app.evaluate(COLLAFUSE)
def collafuse_evaluate(msg: Message, context: Context) -> Message:
    """Finish the server's x_{t_c} with the own model, score the samples, and audit the server's guess."""
    cfg, pid, _, data = node_job(context)
    t_cut = cut(cfg, msg)
    config = msg.content[CONFIG]
    device = pick_device(cfg.train.device)
    server_round = int(config.get(SERVER_ROUND, 0))  # type: ignore[call-overload]
    local = own_model(cfg, msg, context, pid, upto=server_round or None, sampling=True)
    model, directory = local.model, local.directory
    if t_cut > 0 and local.saved is None:
        raise RuntimeError(f"node {context.node_id} owns t < {t_cut} but has no model of its own in {directory} yet")
    diffusion = build_diffusion(cfg)
    images = data.val.images[: cfg.eval.max_val_examples or len(data.val)]
    metrics = MetricRecord({NUM_EXAMPLES: len(images), PARTITION_ID: pid})
    if t_cut > 0:  # the held-out loss on the timesteps this client owns
        metrics["eval-loss"] = denoising_loss(model, diffusion, images, batch_size=cfg.eval.batch_size,
                                              seed=eval_seed(cfg.seed, pid), device=device, t_range=(0, t_cut))
    arrays = msg.content.array_records.get(SPLIT, ArrayRecord())
    metrics.update(audit_denoiser(directory, arrays, int(config.get(AUDIT_ROUND, 0))))  # type: ignore[call-overload]
    reply = RecordDict({METRICS: metrics})
    x = decode_array(arrays[X_CUT]) if X_CUT in arrays else torch.empty(0)
    if len(x):
        ev = cfg.eval
        started = time.perf_counter()
        samples = client_half(model, diffusion, x, t_cut, kind=ev.sampler, steps=ev.sampler_steps,
                              seed=int(config[SAMPLE_SEED]), device=device,  # type: ignore[call-overload]
                              batch_size=ev.batch_size)
        metrics["infer-seconds"] = time.perf_counter() - started
        metrics["infer-images"] = len(samples)
        meter = quality_meter(cfg, device)
        if meter.enabled and len(samples) >= ev.metric_samples:
            metrics.update(meter.score(samples[: ev.metric_samples]))
        reply[SAMPLES] = ArrayRecord({IMAGES: encode_tensor(to_uint8(samples[: ev.num_samples]))})
    return Message(reply, reply_to=msg)

