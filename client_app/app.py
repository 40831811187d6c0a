"""ClientApp: local DDPM training and held-out denoising loss on this node's partition.

FedDiffuse's methods use the default ``train``/``evaluate`` actions; CollaFuse's split
learning uses its own named actions, ``train.collafuse`` and ``evaluate.collafuse``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedapp.config import FedConfig, parse_config
from fedapp.data.pixels import to_uint8
from fedapp.data.share import LocalData, local_data
from fedapp.eval.disclosure import audit_upload, similarity
from fedapp.model.build import build_diffusion, build_model
from fedapp.model.unet import UNet, unet_parts
from fedapp.protocol.keys import (
    ARRAYS,
    AUDIT_ROUND,
    AUDIT_X0,
    COLLAFUSE,
    CONFIG,
    IMAGES,
    METRICS,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    PARTITION_ID,
    REPORT_PARTS,
    SAMPLE_SEED,
    SAMPLES,
    SERVER_ROUND,
    SPLIT,
    STATE_RUN,
    T_CUT,
    UPLOAD,
    X_CUT,
    eval_seed,
    train_seed,
)
from fedapp.protocol.methods import ALL_PARTS, is_personalized, parts_keys, private_parts
from fedapp.protocol.records import (
    decode_array,
    decode_record,
    encode_tensor,
    load_record,
    model_to_record,
    upload_to_record,
)
from fedapp.runs.node_state import (
    load_node_file,
    load_node_model,
    node_dir,
    save_node_file,
    save_node_model,
    state_root,
)
from fedapp.train.collafuse import client_half, client_round
from fedapp.train.loop import denoising_loss, pick_device, train_local

if TYPE_CHECKING:
    from fedapp.eval.quality import QualityMeter

app = ClientApp()


def _node_job(context: Context) -> tuple[FedConfig, int, int, LocalData]:
    cfg = parse_config(context.run_config)
    pid, num = node_partition(context.node_config, cfg.data.num_partitions)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    return cfg, pid, num, local_data(cfg.data, cfg.seed, pid, num)


def node_partition(node_config: Mapping[str, object], configured: int) -> tuple[int, int]:
    """This node's (partition-id, num-partitions); ``data.num-partitions`` fills in a missing count."""
    if PARTITION_ID not in node_config:
        raise KeyError(
            "node config lacks 'partition-id': start the SuperNode with "
            "--node-config 'partition-id=<i> num-partitions=<n>'"
        )
    pid = int(node_config[PARTITION_ID])  # type: ignore[call-overload]
    given = int(node_config.get(NUM_PARTITIONS, 0))  # type: ignore[call-overload]
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
    raw = str(config.get(REPORT_PARTS, "") or "")
    parts = tuple(p for p in raw.split(",") if p) or ALL_PARTS
    unknown = [p for p in parts if p not in ALL_PARTS]
    if unknown:
        raise ValueError(f"server asked for unknown UNet parts {unknown}; known: {', '.join(ALL_PARTS)}")
    return parts


def state_dir(cfg: FedConfig, msg: Message, context: Context, pid: int) -> Path:
    """This partition's state folder, under the run the server names (a resumed run names the first)."""
    run_id = int(msg.content[CONFIG].get(STATE_RUN, context.run_id))  # type: ignore[call-overload]
    return node_dir(state_root(cfg.train.node_state_dir), run_id, pid)


def inject_fault(cfg: FedConfig, pid: int, server_round: int) -> None:
    """``faults.*``: fail on purpose, so tests can show the round goes on without this client."""
    if cfg.faults.hangs(pid, server_round):
        time.sleep(cfg.faults.hang_seconds)
    if cfg.faults.crashes(pid, server_round):
        raise RuntimeError(f"injected fault: partition {pid} crashes in round {server_round} (faults.crash)")


def personal_model(cfg: FedConfig, msg: Message, context: Context, pid: int,
                   upto: int | None = None) -> tuple[UNet, Path]:
    """The global arrays received, with this node's own saved parts where it keeps private ones.

    Once a node has trained, its private parts come from its disk even if the server sends
    them (as it does again after a lost reply or to a restarted SuperNode), so they are never
    reset to the server's copy. ``upto``: the newest saved round it may start from.
    """
    model = build_model(cfg)
    incoming = msg.content[ARRAYS]
    directory = state_dir(cfg, msg, context, pid)
    own = set(model.state_dict())
    missing = own - set(incoming.keys())
    keep = set(parts_keys(private_parts(cfg.strategy.name), unet_parts(model)))
    saved = load_node_model(directory, upto) if (missing or keep) else None
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
    server_round = int(msg.content[CONFIG][SERVER_ROUND])
    device = pick_device(cfg.train.device)
    report = report_parts(msg.content[CONFIG])
    model, directory = personal_model(cfg, msg, context, pid, upto=server_round - 1)
    report_keys = parts_keys(report, unet_parts(model))
    result = train_local(
        model,
        build_diffusion(cfg),
        data.train.images,
        epochs=cfg.train.local_epochs,
        batch_size=cfg.train.batch_size,
        lr=cfg.train.lr,
        seed=train_seed(cfg.seed, server_round, pid),
        device=device,
        max_steps=cfg.train.max_steps_per_round,
        trainable=report_keys if cfg.train.scope == "shared" else None,
        progress=cfg.output.progress,
        desc=f"client {pid} round {server_round}",
    )
    inject_fault(cfg, pid, server_round)
    metrics = MetricRecord(
        {
            NUM_EXAMPLES: len(data.train),
            "train-loss": result.loss,
            "train-steps": result.steps,
            "train-seconds": result.seconds,
            "images-per-s": result.images_per_s,
            PARTITION_ID: pid,
            NUM_PARTITIONS: num,
        }
    )
    if is_personalized(cfg.strategy.name):
        save_node_model(directory, model.state_dict(), pid, server_round)
    arrays = model_to_record(model, keys=report_keys, dtype=cfg.transport.dtype)
    reply = RecordDict({ARRAYS: arrays, METRICS: metrics})
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, pid, _, data = _node_job(context)
    device = pick_device(cfg.train.device)
    server_round = int(msg.content[CONFIG].get(SERVER_ROUND, 0))  # type: ignore[call-overload]
    model, _ = personal_model(cfg, msg, context, pid, upto=server_round or None)
    cap = cfg.eval.max_val_examples or len(data.val)
    images = data.val.images[:cap]
    loss = denoising_loss(
        model, build_diffusion(cfg), images,
        batch_size=cfg.eval.batch_size, seed=eval_seed(cfg.seed, pid), device=device,
    )
    metrics = MetricRecord({NUM_EXAMPLES: len(images), "eval-loss": loss})
    if is_personalized(cfg.strategy.name) and cfg.eval.is_eval_round(server_round, cfg.train.rounds):
        meter = quality_meter(cfg, device)
        if meter.enabled:
            scores, _ = meter.measure(model, build_diffusion(cfg))
            metrics.update(scores)  # the server reports their mean ± std over clients
    return Message(RecordDict({METRICS: metrics}), reply_to=msg)


@lru_cache(maxsize=2)
def quality_meter(cfg: FedConfig, device: torch.device) -> QualityMeter:
    """One per process, so a ClientApp that serves many rounds loads its feature networks once.

    Imported here: a deployed node starts a process per message, and only a personalized
    client's evaluation on an eval round needs pytorch-fid and scipy.
    """
    from fedapp.eval.quality import QualityMeter
    return QualityMeter(cfg, device)


# ------------------------------------------------------------------------------------ CollaFuse
AUDIT_FILE = "collafuse-audit.pt"


def _cut(cfg: FedConfig, msg: Message) -> int:
    """t_c, which the server states in every message; both sides must have derived the same one."""
    own = cfg.collafuse.cut(cfg.diffusion.timesteps)
    sent = int(msg.content[CONFIG].get(T_CUT, own))  # type: ignore[call-overload]
    if sent != own:
        raise ValueError(f"server's cut t_c = {sent} but this node's config gives {own}; run configs differ")
    return own


def own_model(cfg: FedConfig, msg: Message, context: Context, pid: int,
              upto: int | None) -> tuple[UNet, Path, bool]:
    """This client's private denoiser from its disk (the seeded initialization before its first round)."""
    directory = state_dir(cfg, msg, context, pid)
    model = build_model(cfg, seed=cfg.seed)
    saved = load_node_model(directory, upto)
    if saved is not None:
        model.load_state_dict(saved["model"])  # type: ignore[arg-type]
    return model, directory, saved is not None


@app.train(COLLAFUSE)
def collafuse_train(msg: Message, context: Context) -> Message:
    """Train the own model below the cut; send the server the draws above it (never the images)."""
    cfg, pid, num, data = _node_job(context)
    t_cut = _cut(cfg, msg)
    server_round = int(msg.content[CONFIG][SERVER_ROUND])
    model, directory, _ = own_model(cfg, msg, context, pid, upto=server_round - 1)
    diffusion = build_diffusion(cfg)
    done, upload = client_round(
        model, diffusion, data.train.images, t_cut,
        epochs=cfg.train.local_epochs, batch_size=cfg.train.batch_size, lr=cfg.train.lr,
        seed=train_seed(cfg.seed, server_round, pid), device=pick_device(cfg.train.device),
        upload_cap=cfg.collafuse.upload_samples, max_steps=cfg.train.max_steps_per_round,
        progress=cfg.output.progress, desc=f"collafuse client {pid} round {server_round}",
    )
    inject_fault(cfg, pid, server_round)
    save_node_model(directory, model.state_dict(), pid, server_round)
    record = upload_to_record(upload, cfg.transport.dtype)
    sent = decode_record(record)  # the audit scores exactly what the server receives
    keep = min(cfg.collafuse.audit_samples, len(upload))
    save_node_file(directory, AUDIT_FILE, {"round": server_round, "x0": upload.x0[:keep]})
    metrics = MetricRecord({
        NUM_EXAMPLES: len(data.train),
        "train-loss": done.own.loss,
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


def _audit_denoiser(directory: Path, arrays: ArrayRecord, audit_round: int) -> dict[str, float]:
    """The server's own reconstruction of this client's last upload, scored against the real images."""
    stored = load_node_file(directory, AUDIT_FILE)
    if AUDIT_X0 not in arrays or stored is None or int(stored["round"]) != audit_round:  # type: ignore[call-overload]
        return {}
    rebuilt = decode_array(arrays[AUDIT_X0])
    real: torch.Tensor = stored["x0"]  # type: ignore[assignment]
    if rebuilt.shape != real.shape:
        raise ValueError(f"server sent {tuple(rebuilt.shape)} reconstructions for {tuple(real.shape)} audit images")
    return similarity(rebuilt, real, "audit-denoise")


@app.evaluate(COLLAFUSE)
def collafuse_evaluate(msg: Message, context: Context) -> Message:
    """Finish the server's x_{t_c} with the own model, score the samples, and audit the server's guess."""
    cfg, pid, _, data = _node_job(context)
    t_cut = _cut(cfg, msg)
    config = msg.content[CONFIG]
    device = pick_device(cfg.train.device)
    server_round = int(config.get(SERVER_ROUND, 0))  # type: ignore[call-overload]
    model, directory, trained = own_model(cfg, msg, context, pid, upto=server_round or None)
    if t_cut > 0 and not trained:
        raise RuntimeError(f"node {context.node_id} owns t < {t_cut} but has no model of its own in {directory} yet")
    diffusion = build_diffusion(cfg)
    images = data.val.images[: cfg.eval.max_val_examples or len(data.val)]
    metrics = MetricRecord({NUM_EXAMPLES: len(images), PARTITION_ID: pid})
    if t_cut > 0:  # the held-out loss on the timesteps this client owns
        metrics["eval-loss"] = denoising_loss(model, diffusion, images, batch_size=cfg.eval.batch_size,
                                              seed=eval_seed(cfg.seed, pid), device=device, t_range=(0, t_cut))
    arrays = msg.content.array_records.get(SPLIT, ArrayRecord())
    metrics.update(_audit_denoiser(directory, arrays, int(config.get(AUDIT_ROUND, 0))))  # type: ignore[call-overload]
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

