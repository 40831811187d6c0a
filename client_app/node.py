"""What a ClientApp's handlers share: this node's job, its partition, and the models it keeps on its disk.

Private parts (ULatDec's and UDec's encoder, CollaFuse's whole client model) live under
``<node-state-dir>/run-<first run id>/partition-<id>/``, so a restarted SuperNode finds them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedapp.config import FedConfig, parse_config
from fedapp.data.share import LocalData, local_data
from fedapp.eval.disclosure import similarity
from fedapp.model.build import build_model
from fedapp.model.unet import UNet, unet_parts
from fedapp.privacy.accounting import PrivacyAccount
from fedapp.privacy.dpsgd import SampleLevelDP
from fedapp.privacy.mechanism import add_noise, clip_update, update_norm
from fedapp.protocol.delta import RESYNC, add_change, client_update, quantizer_for, state_digest
from fedapp.protocol.keys import (
    ARRAYS,
    AUDIT_X0,
    CONFIG,
    DP_SGD_EPSILON,
    INIT_DIGEST,
    NUM_PARTITIONS,
    PARTITION_ID,
    REPORT_PARTS,
    STATE_RUN,
    T_CUT,
    TRANSPORT,
    TRANSPORT_BASE,
    TRANSPORT_VERSION,
)
from fedapp.protocol.methods import ALL_PARTS, parts_keys, private_parts, shared_keys
from fedapp.protocol.records import (
    ArrayProblem,
    decode_array,
    encode_state,
    load_record,
    model_to_record,
)
from fedapp.runs.node_state import (
    DP_SGD_ACCOUNT,
    OPTIMIZER,
    REFERENCE,
    RESIDUAL,
    load_node_file,
    load_node_model,
    load_node_round,
    node_dir,
    sampling_weights,
    save_node_model,
    save_node_round,
    state_root,
)
from fedapp.train.ema import ema_state, make_ema
from fedapp.train.loop import TrainResult

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel

    from fedapp.eval.quality import QualityMeter


def node_job(context: Context) -> tuple[FedConfig, int, int, LocalData]:
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


@dataclass
class LocalModel:
    """The model a handler works on, with where it came from."""

    model: UNet
    directory: Path  # this node's state folder
    saved: dict[str, object] | None  # the saved payload its own parts came from (None: none yet)
    reference: dict[str, torch.Tensor] | None = None  # delta payload: the shared arrays' version it started from


def personal_model(cfg: FedConfig, msg: Message, context: Context, pid: int,
                   upto: int | None = None, sampling: bool = False) -> LocalModel:
    """The global arrays received, with this node's own saved parts where it keeps private ones.

    Once a node has trained, its private parts come from its disk even if the server sends
    them (as it does again after a lost reply or to a restarted SuperNode), so they are never
    reset to the server's copy. ``upto``: the newest saved round it may start from.
    ``sampling``: a personal model's EMA, where it keeps one, replaces the whole model (it
    averages the model this client trained, the received shared parts included).
    """
    model = build_model(cfg)
    directory = state_dir(cfg, msg, context, pid)
    incoming, reference = received_arrays(cfg, msg, directory, pid)
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
    if saved is not None and sampling and keep:
        model.load_state_dict(sampling_weights(saved))
    elif saved is not None:
        take = missing | keep
        model.load_state_dict({k: v for k, v in saved["model"].items() if k in take}, strict=False)
    return LocalModel(model, directory, saved, reference)


# ------------------------------------------------------------------------------------ transport
def received_arrays(cfg: FedConfig, msg: Message, directory: Path,
                    pid: int) -> tuple[ArrayRecord, dict[str, torch.Tensor] | None]:
    """(the model arrays the server means, the reference version they make: delta payload only).

    As sent, or, with a delta payload, the seeded initialization with the shared arrays of the
    reference version the message makes (kept on disk for the next one) and any other array the
    message carries whole (private parts from a checkpoint, on a node's first round).
    """
    if cfg.transport.payload != "delta":
        return msg.content[ARRAYS], None
    config = msg.content[CONFIG]
    version, base = int(config[TRANSPORT_VERSION]), int(config[TRANSPORT_BASE])  # type: ignore[call-overload]
    init = build_model(cfg, seed=cfg.seed).state_dict()
    keys = shared_keys(cfg.strategy.name, unet_parts(init))
    record = msg.content.array_records.get(ARRAYS, ArrayRecord())
    change = ArrayRecord({k: record[k] for k in record.keys() if k in keys})
    other = ArrayRecord({k: record[k] for k in record.keys() if k not in keys})
    try:
        whole = add_change({k: torch.zeros_like(v) for k, v in init.items() if k not in keys}, other)
        if base == RESYNC:
            if set(change.keys()) != set(keys):
                raise ArrayProblem(f"a whole version holds {len(change)} arrays, the method shares {len(keys)}")
            reference = add_change({k: torch.zeros_like(init[k]) for k in keys}, change)
        else:
            held = held_reference(directory, base, init, keys, str(config.get(INIT_DIGEST, "")))
            reference = held if base == version else {**held, **add_change(held, change)}
    except ArrayProblem as err:
        raise ValueError(f"transport version {version} from the server does not decode: {err}") from None
    if base != version:
        save_node_round(directory, REFERENCE, {"arrays": reference}, pid, version)
    return encode_state({**init, **whole, **reference}), reference


def held_reference(directory: Path, version: int, init: Mapping[str, torch.Tensor], keys: list[str],
                   init_digest: str) -> dict[str, torch.Tensor]:
    """This node's reference of ``version``: the seeded initialization (checked against the server's
    fingerprint) for 0, else the one on its disk."""
    if version == 0:
        if init_digest and state_digest(init, keys) != init_digest:
            raise RuntimeError("this node's seeded initialization differs from the server's (another torch "
                               "version or model config?); use transport.payload = \"weights\"")
        return {k: init[k].float() for k in keys}
    for payload in (load_node_round(directory, REFERENCE, version), load_node_round(directory, REFERENCE)):
        if payload is not None and int(payload["round"]) == version:  # type: ignore[call-overload]
            return payload["arrays"]  # type: ignore[return-value]
    raise RuntimeError(f"the server sent a change to transport version {version}, which this node no longer "
                       f"holds in {directory}; the next message will carry a version whole")


def upload(cfg: FedConfig, msg: Message, local: LocalModel, keys: list[str], pid: int, server_round: int,
           seed: int) -> RecordDict:
    """A train reply's arrays: the reported weights, or with a delta payload their change to the
    reference this round started from (plus the carried residual, whose new value stays on disk)."""
    transport, directory = cfg.transport, local.directory
    if transport.payload != "delta":
        return RecordDict({ARRAYS: model_to_record(local.model, keys, transport.dtype, quantizer_for(transport, seed))})
    if local.reference is None:
        raise RuntimeError("a delta upload needs the reference its round started from")
    version = int(msg.content[CONFIG][TRANSPORT_VERSION])  # type: ignore[call-overload]
    carried = load_node_round(directory, RESIDUAL, server_round - 1) if transport.error_feedback else None
    record, residual = client_update(local.model.state_dict(), local.reference,
                                     carried["arrays"] if carried else None,  # type: ignore[arg-type]
                                     keys, transport, seed)
    if transport.error_feedback:
        save_node_round(directory, RESIDUAL, {"arrays": residual}, pid, server_round)
    return RecordDict({ARRAYS: record, TRANSPORT: ConfigRecord({TRANSPORT_BASE: version})})


def private_update(cfg: FedConfig, model: UNet, received: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Client-level privacy on this round's update over the reported arrays (``received``: what they were
    before training): clipped to ``privacy.clip``, with this client's own noise where it adds it, written
    back into ``model``. Without privacy, the update's norm only, as a metric that helps choose a clip."""
    state = model.state_dict()
    trained = {k: state[k] for k in received}
    if not cfg.privacy.client_level:
        return {"update-norm": update_norm(trained, received)}
    clipped, _ = clip_update(trained, received, cfg.privacy.clip)  # the norm itself stays here: it would leak
    if cfg.privacy.noise == "client":
        from fedapp.privacy.accounting import client_level_release  # Opacus: only on a private client's round

        sigma, _ = client_level_release(cfg)
        clipped = add_noise(clipped, sigma * cfg.privacy.clip)
    model.load_state_dict(clipped, strict=False)
    return {}


def sample_level_account(cfg: FedConfig, dp: SampleLevelDP, steps: int, directory: Path, pid: int,
                         server_round: int) -> dict[str, float]:
    """This client's DP-SGD account after this round's ``steps``, kept on its disk like its Adam state (a
    repeated round continues the account of the round before); its ε at ``privacy.delta`` as a metric."""
    saved = load_node_round(directory, DP_SGD_ACCOUNT, server_round - 1)
    account = PrivacyAccount.from_state(saved["account"]) if saved else PrivacyAccount(cfg.privacy.delta)  # type: ignore[arg-type]
    dp.account(account, steps)
    save_node_round(directory, DP_SGD_ACCOUNT, {"account": account.state()}, pid, server_round)
    return {DP_SGD_EPSILON: account.epsilon()} if dp.noise_multiplier else {}


def carried_state(cfg: FedConfig, model: UNet, directory: Path, upto: int, keeps_ema: bool,
                  own: dict[str, object] | None) -> tuple[dict[str, object] | None, EMAModel | None]:
    """What this client's trainer continues from: its Adam state (``persist``) and its model's EMA.

    ``keeps_ema``: the client's model is its own (ULatDec, UDec, CollaFuse), so its EMA lives here,
    in ``own`` (the saved model payload the model was built from); a global model's EMA is the server's.
    """
    optimizer = None
    if cfg.train.optimizer_state == "persist":
        saved = load_node_round(directory, OPTIMIZER, upto)
        optimizer = saved["optimizer"] if saved is not None else None
    ema = make_ema(model, cfg.train, own.get("ema") if own is not None else None) if keeps_ema else None  # type: ignore[arg-type]
    return optimizer, ema  # type: ignore[return-value]


def save_trained(cfg: FedConfig, directory: Path, model: UNet, result: TrainResult, ema: EMAModel | None,
                 pid: int, server_round: int, own_model: bool) -> None:
    """After a round: the Adam state (``persist``), and the own model with its EMA where it is the client's."""
    if cfg.train.optimizer_state == "persist" and result.optimizer is not None:
        save_node_round(directory, OPTIMIZER, {"optimizer": result.optimizer}, pid, server_round)
    if own_model:
        save_node_model(directory, model.state_dict(), pid, server_round,
                        ema=ema_state(ema, model) if ema is not None else None)


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


def cut(cfg: FedConfig, msg: Message) -> int:
    """t_c, which the server states in every message; both sides must have derived the same one."""
    own = cfg.collafuse.cut(cfg.diffusion.timesteps)
    sent = int(msg.content[CONFIG].get(T_CUT, own))  # type: ignore[call-overload]
    if sent != own:
        raise ValueError(f"server's cut t_c = {sent} but this node's config gives {own}; run configs differ")
    return own


def own_model(cfg: FedConfig, msg: Message, context: Context, pid: int,
              upto: int | None, sampling: bool = False) -> LocalModel:
    """This client's private denoiser from its disk (the seeded initialization before its first round).

    ``sampling``: its EMA weights where it keeps an EMA.
    """
    directory = state_dir(cfg, msg, context, pid)
    model = build_model(cfg, seed=cfg.seed)
    saved = load_node_model(directory, upto)
    if saved is not None:
        model.load_state_dict(sampling_weights(saved) if sampling else saved["model"])  # type: ignore[arg-type]
    return LocalModel(model, directory, saved)


def audit_denoiser(directory: Path, arrays: ArrayRecord, audit_round: int) -> dict[str, float]:
    """The server's own reconstruction of this client's last upload, scored against the real images."""
    stored = load_node_file(directory, AUDIT_FILE)
    if AUDIT_X0 not in arrays or stored is None or int(stored["round"]) != audit_round:  # type: ignore[call-overload]
        return {}
    rebuilt = decode_array(arrays[AUDIT_X0])
    real: torch.Tensor = stored["x0"]  # type: ignore[assignment]
    if rebuilt.shape != real.shape:
        raise ValueError(f"server sent {tuple(rebuilt.shape)} reconstructions for {tuple(real.shape)} audit images")
    return similarity(rebuilt, real, "audit-denoise")

