"""CollaFuse: the server trains its own denoiser on the noised samples clients send; nothing is averaged.

The server's model owns t >= t_c. Training rounds send no weights down: each client
trains its private model below the cut and replies with (x_t, t, target) triples above
it, which the server checks and learns from with an optimizer that persists across rounds.
Evaluation rounds run split inference: the server denoises x_T -> x_{t_c} for each client,
which finishes the chain with its own model and scores its samples. With ``train.ema-decay``
the server's model has an EMA over its every step, as each client's own model has; the server's
half of the chain and the audit's reconstructions use it, and checkpoints keep it where every
run keeps its sampling weights (``fedapp sample`` and ``fedapp resume`` read it there).
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedapp.config import FedConfig
from fedapp.data.pixels import image_shape, to_model_range
from fedapp.eval.disclosure import denoiser_reconstruction
from fedapp.files import one_line
from fedapp.log import log
from fedapp.model.build import build_diffusion, build_model
from fedapp.protocol.keys import (
    AUDIT_ROUND,
    AUDIT_X0,
    COLLAFUSE,
    COLLAFUSE_EVALUATE,
    COLLAFUSE_TRAIN,
    IMAGES,
    PARTITION_ID,
    SAMPLE_SEED,
    SAMPLES,
    SERVER_ROUND,
    SPLIT,
    T_CUT,
    UPLOAD,
    UPLOAD_KEYS,
    X_CUT,
    sample_seeds,
    server_train_seed,
)
from fedapp.protocol.metrics import mean_std_over_clients
from fedapp.protocol.records import (
    ArrayProblem,
    decode_checked,
    encode_tensor,
    load_record,
    model_to_record,
)
from fedapp.train.collafuse import (
    chain_split,
    server_half,
    server_steps,
)
from fedapp.train.ema import ema_state, load_ema, make_ema
from fedapp.train.loop import pick_device
from fedapp.train.optim import Recipe, Stepper
from strategies.base import FedappStrategy, StrategyState
from strategies.validation import by_node, canonical_metrics, weight_problem

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel

TRAIN_ACTION = COLLAFUSE_TRAIN
Triples = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (x_t, t, target) as received
EVALUATE_ACTION = COLLAFUSE_EVALUATE


class CollaFuse(FedappStrategy):
    """FedAvg's sampling and round loop; its own training (on received triples) and split evaluation."""

    method = COLLAFUSE

    def __init__(self, cfg: FedConfig, **kwargs: Any) -> None:
        kwargs.setdefault("evaluate_metrics_aggr_fn", mean_std_over_clients)  # each client scores its own model
        super().__init__(max_num_examples=cfg.strategy.max_num_examples,
                         min_valid_replies=cfg.strategy.min_valid_replies, **kwargs)
        self.cfg = cfg
        self.diffusion = build_diffusion(cfg)
        self.t_cut = cfg.collafuse.cut(cfg.diffusion.timesteps)
        self.device = pick_device(cfg.train.device)
        channels, side = image_shape(cfg.data)
        self.shape = (channels, side, side)
        self.model = build_model(cfg)
        self.stepper = Stepper(dict(self.model.named_parameters()), Recipe.from_config(cfg.train))
        # Its first step copies the weights (diffusers' warm-up), so it never averages in the initialization.
        self.ema = make_ema(self.model, cfg.train)
        self.averaged = copy.deepcopy(self.model) if self.ema is not None else self.model
        # The first audit-samples triples of each node's last accepted upload (what the audit rebuilds).
        self.audit_inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.audit_round = 0
        self.partition: dict[int, int] = {}
        # round -> node -> counter -> value: denoising work and wall time on each side
        self.compute: dict[int, dict[int, defaultdict[str, float]]] = defaultdict(dict)
        self.samples: dict[int, dict[int, torch.Tensor]] = {}  # round -> partition id -> uint8 images

    def _counters(self, server_round: int, node: int) -> defaultdict[str, float]:
        return self.compute[server_round].setdefault(node, defaultdict(float))

    # ------------------------------------------------------------------------------- messages
    def _messages(self, node_ids: Iterable[int], action: str, config: ConfigRecord,
                  arrays: dict[int, ArrayRecord] | None = None,
                  extra: dict[int, dict[str, int]] | None = None) -> list[Message]:
        out = []
        for node in node_ids:
            content = RecordDict({self.configrecord_key: ConfigRecord(
                {**dict(config), T_CUT: self.t_cut, **(extra or {}).get(node, {})})})
            if arrays is not None:
                content[SPLIT] = arrays[node]
            out.append(Message(content=content, message_type=action, dst_node_id=node))
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """No weights go down: the clients' models are their own, and the server's stays here."""
        load_record(self.model, arrays)
        sampled = super().configure_train(server_round, ArrayRecord(), config, grid)
        config[SERVER_ROUND] = server_round
        return self._messages([m.metadata.dst_node_id for m in sampled], TRAIN_ACTION, config)

    # ------------------------------------------------------------------------------- training
    def upload_problem(self, content: RecordDict) -> str | None:
        """Why a reply cannot be trained on, or None: one bad client must not poison the shared model."""
        return self._checked_upload(content)[0]

    def _checked_upload(self, content: RecordDict) -> tuple[str | None, Triples | None]:
        """(problem, None) for a bad reply, (None, its decoded triples) for a good one."""
        problem = weight_problem(content, self.weighted_by_key, self.max_num_examples)
        if problem:
            return problem, None
        if set(content.array_records) != {UPLOAD}:
            return f"expected one ArrayRecord named 'upload', got {sorted(content.array_records)}", None
        record = content.array_records[UPLOAD]
        if set(record.keys()) != set(UPLOAD_KEYS):
            return f"upload holds {sorted(record.keys())}, expected {sorted(UPLOAD_KEYS)}", None
        decoded: list[torch.Tensor] = []
        for key in UPLOAD_KEYS:
            try:
                decoded.append(decode_checked(record[key], None, floats=key != "t"))
            except ArrayProblem as err:
                return f"upload array {key!r}: {err}", None
        x_t, t, target = decoded
        n = len(t) if t.dim() else 0
        if t.dtype != torch.int64 or t.dim() != 1:
            return f"t must be a 1-d int64 array, got {t.dtype} of shape {tuple(t.shape)}", None
        for name, tensor in (("x-t", x_t), ("target", target)):
            if not tensor.is_floating_point():
                return f"{name} must be floating point, got {tensor.dtype}", None
            if tuple(tensor.shape) != (n, *self.shape):
                return f"{name} has shape {tuple(tensor.shape)}, expected {(n, *self.shape)}", None
            if not bool(torch.isfinite(tensor).all()):
                return f"{name} holds non-finite values", None
        if n > self.cfg.collafuse.upload_samples:
            return f"{n} samples exceed collafuse.upload-samples = {self.cfg.collafuse.upload_samples}", None
        if n and not (int(t.min()) >= self.t_cut and int(t.max()) < self.diffusion.timesteps):
            return (f"t spans [{int(t.min())}, {int(t.max())}], outside the server's "
                    f"[{self.t_cut}, {self.diffusion.timesteps})"), None
        return None, (x_t, t, target)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(by_node(replies), is_train=True, validate=False)
        good: list[Message] = []
        uploads: dict[int, Triples] = {}
        for reply in valid:
            problem, triples = self._checked_upload(reply.content)
            if triples is None:
                log(WARNING, "dropping reply from node %d: %s", reply.metadata.src_node_id, problem)
            else:
                good.append(reply)
                uploads[reply.metadata.src_node_id] = triples
        if not good:
            return None, None
        canonical_metrics([m.content for m in good])
        for reply in good:
            node = reply.metadata.src_node_id
            metrics = reply.content.metric_records[next(iter(reply.content.metric_records))]
            self.partition[node] = int(metrics.get(PARTITION_ID, -1))  # type: ignore[call-overload]
            row = self._counters(server_round, node)
            row["train-client-samples"] += float(metrics.get("client-samples", 0))  # type: ignore[arg-type]
            row["train-client-seconds"] += float(metrics.get("train-seconds", 0.0))  # type: ignore[arg-type]
        keep = self.cfg.collafuse.audit_samples
        self.audit_inputs = {node: (x_t[:keep], t[:keep]) for node, (x_t, t, _) in uploads.items() if len(t)}
        self.audit_round = server_round
        total = sum(len(t) for _, t, _ in uploads.values())
        result = None
        if total:
            nodes = sorted(uploads, key=lambda n: (self.partition.get(n, -1), n))  # partition order, as by_node
            self.stepper.recipe = Recipe.from_config(self.cfg.train, server_round)  # the lr decay's share
            result = server_steps(
                self.model, self.stepper, self.diffusion,
                torch.cat([uploads[n][0] for n in nodes]), torch.cat([uploads[n][1] for n in nodes]),
                torch.cat([uploads[n][2] for n in nodes]),
                epochs=self.cfg.collafuse.server_epochs, batch_size=self.cfg.train.batch_size,
                seed=server_train_seed(self.cfg.seed, server_round), device=self.device, ema=self.ema,
            )
            self.model.to("cpu")
            if self.ema is not None:
                self.ema.to("cpu")
            for node, (_, t, _) in uploads.items():  # the server's time, split by what each client sent
                share = len(t) / total
                self._counters(server_round, node)["train-server-samples"] += len(t) * self.cfg.collafuse.server_epochs
                self._counters(server_round, node)["train-server-seconds"] += result.seconds * share
            log(INFO, "CollaFuse round %d: server trained on %d samples from %d clients (loss %.4f)",
                server_round, total, len(uploads), result.loss)
        metrics = self.train_metrics_aggr_fn([m.content for m in good], self.weighted_by_key)
        metrics["server-samples"] = total
        metrics["server-steps"] = result.steps if result else 0
        if result:  # c = 1: nothing to train on, and so no loss
            metrics["server-train-loss"] = result.loss
        return model_to_record(self.model), metrics

    # ----------------------------------------------------------------------------- evaluation
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Per node: the server's half of its samples (on eval rounds) and its audit reconstructions."""
        load_record(self.model, arrays)
        sampled = super().configure_evaluate(server_round, ArrayRecord(), config, grid)
        nodes = [m.metadata.dst_node_id for m in sampled]
        ev = self.cfg.eval
        n = max(ev.metric_samples, ev.num_samples) if ev.is_eval_round(server_round, self.cfg.train.rounds) else 0
        per_node: dict[int, ArrayRecord] = {}
        extra: dict[int, dict[str, int]] = {}
        server_steps_per_image, _ = chain_split(self.diffusion, self.t_cut, ev.sampler, ev.sampler_steps)
        model = self.sampling_model()
        for node in nodes:
            # by partition, not by Flower's node id (new every run), so a seeded run samples the same images
            server_seed, client_seed = sample_seeds(self.cfg.seed, server_round, self.partition.get(node, node))
            record = ArrayRecord()
            if n:
                started = time.perf_counter()
                x = server_half(model, self.diffusion, n, self.shape, self.t_cut, kind=ev.sampler,
                                steps=ev.sampler_steps, seed=server_seed, device=self.device,
                                batch_size=ev.batch_size)
                row = self._counters(server_round, node)
                row["infer-server-seconds"] += time.perf_counter() - started
                row["infer-server-steps"] += n * server_steps_per_image
                record[X_CUT] = encode_tensor(x)
            if node in self.audit_inputs:
                x_t, t = self.audit_inputs[node]
                record[AUDIT_X0] = encode_tensor(denoiser_reconstruction(
                    model, self.diffusion, x_t, t, ev.batch_size, self.device))
            model.to("cpu")
            per_node[node] = record
            extra[node] = {SAMPLE_SEED: client_seed, AUDIT_ROUND: self.audit_round}
        config[SERVER_ROUND] = server_round
        return self._messages(nodes, EVALUATE_ACTION, config, per_node, extra)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        valid = self.valid_evaluate_replies(server_round, replies)
        _, client_steps_per_image = chain_split(self.diffusion, self.t_cut, self.cfg.eval.sampler,
                                                self.cfg.eval.sampler_steps)
        for reply in valid:
            metrics = list(reply.content.metric_records.values())[0]
            pid = int(metrics.get(PARTITION_ID, -1))  # type: ignore[call-overload]
            row = self._counters(server_round, reply.metadata.src_node_id)
            images = float(metrics.get("infer-images", 0))  # type: ignore[arg-type]
            row["infer-client-seconds"] += float(metrics.get("infer-seconds", 0.0))  # type: ignore[arg-type]
            row["infer-client-steps"] += images * client_steps_per_image
            if SAMPLES in reply.content.array_records:
                try:
                    grid = decode_checked(reply.content[SAMPLES][IMAGES], None, floats=False)
                except (ArrayProblem, KeyError) as err:
                    log(WARNING, "ignoring the samples of node %d: %s", reply.metadata.src_node_id, one_line(err))
                    continue
                if grid.dtype == torch.uint8 and grid.dim() == 4 and tuple(grid.shape[1:]) == self.shape:
                    self.samples.setdefault(server_round, {})[pid] = to_model_range(grid)
        if not valid:
            return None
        return self.evaluate_metrics_aggr_fn([RecordDict(dict(m.content.metric_records)) for m in valid],
                                             self.weighted_by_key)

    # ----------------------------------------------------------------------------- reporting
    def round_report(self, server_round: int) -> dict[str, object]:
        """Denoising work and wall time per client (by partition id), and the clients' share of each."""
        clients = {str(self.partition.get(node, node)): {k: round(v, 4) for k, v in sorted(row.items())}
                   for node, row in sorted(self.compute.get(server_round, {}).items())}
        share: dict[str, float] = {}
        for phase, unit in (("train", "samples"), ("train", "seconds"), ("infer", "steps"), ("infer", "seconds")):
            own = sum(r.get(f"{phase}-client-{unit}", 0.0) for r in clients.values())
            server = sum(r.get(f"{phase}-server-{unit}", 0.0) for r in clients.values())
            if own + server > 0:
                share[f"{phase}-{unit}"] = round(own / (own + server), 4)
        return {"cut-ratio": self.cfg.collafuse.cut_ratio, T_CUT: self.t_cut, "client-share": share,
                "clients": clients}

    def client_samples(self, server_round: int) -> dict[int, torch.Tensor]:
        """Each client's split-inference samples of an evaluation round, by partition id, in [-1, 1]."""
        return dict(sorted(self.samples.get(server_round, {}).items()))

    # ------------------------------------------------------------------------------ the EMA
    @property
    def _stepped_ema(self) -> EMAModel | None:
        """The server model's EMA once it has taken a step; before that (at c = 1 the server never
        trains) the model's own weights are what it samples with."""
        return self.ema if self.ema is not None and self.ema.optimization_step else None

    def sampling_model(self) -> torch.nn.Module:
        """What the server samples and rebuilds with: its model's EMA once that has taken a step."""
        if self._stepped_ema is None:
            return self.model
        self.ema.copy_to(self.averaged.parameters())
        return self.averaged

    def ema_state(self) -> dict[str, object] | None:
        """The server model's EMA, as checkpoints hold sampling weights; None where it has none yet."""
        ema = self._stepped_ema
        return ema_state(ema, self.model) if ema is not None else None

    def restore_ema(self, state: dict[str, object] | None) -> None:
        """A checkpoint made without one leaves the EMA to start again from the resumed weights."""
        if self.ema is not None and state is not None:
            load_ema(self.ema, self.model, state)

    def state(self) -> StrategyState:
        """What a resume needs beyond the weights and the EMA: the server's optimizer."""
        return {"optimizer": self.stepper.state_dict()}

    def restore(self, state: StrategyState) -> None:
        self.stepper.load_state_dict(state["optimizer"])  # type: ignore[arg-type]
