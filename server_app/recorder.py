"""What the server does after each round: checkpoint, samples, and one metrics row."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Protocol

import torch
from flwr.app import ArrayRecord, MessageType, MetricRecord

from fedapp.config import FedConfig
from fedapp.data.partition import plot_label_distribution
from fedapp.data.share import pool_partitioner
from fedapp.data.sources import CLASS_NAMES, DatasetNotFoundError
from fedapp.eval.frechet import METRIC_NAMES, QUALITY_NAMES
from fedapp.eval.grid import save_grid
from fedapp.eval.quality import QualityMeter
from fedapp.log import log
from fedapp.model.diffusion import Diffusion
from fedapp.model.unet import UNet
from fedapp.protocol.comm import CommLedger
from fedapp.protocol.keys import NUM_EXAMPLES, NUM_PARTITIONS, PARTITION_ID
from fedapp.protocol.methods import clients_own_models, is_personalized
from fedapp.protocol.metrics import IDENTIFIERS, mean_std_over_clients, weighted_mean_over_clients
from fedapp.protocol.records import load_record
from fedapp.runs.node_state import collect_node_models, state_root
from fedapp.runs.rows import RoundClock, Row, close_round, quality_entry, summary_line
from fedapp.runs.rundir import RunDir
from fedapp.runs.tracking import Tracker
from fedapp.train.ema import ema_state, load_ema
from fedapp.train.loop import pick_device
from fedapp.train.round_ema import RoundEMA
from server_app.metering import MeteredGrid
from strategies.validation import canonical_metrics, is_count


class SplitServer(Protocol):
    """What a split-learning strategy (CollaFuse) reports beyond the weights."""

    def round_report(self, server_round: int) -> dict[str, object]: ...

    def client_samples(self, server_round: int) -> dict[int, torch.Tensor]: ...

    def ema_state(self) -> dict[str, object] | None: ...

    def restore_ema(self, state: dict[str, object] | None) -> None: ...


class RoundRecorder:
    """The strategy's ``evaluate_fn``: called for round 0 and after every round.

    Each round's checkpoint is written after the round's row is complete and before the row
    is appended to the logs, so a run killed at any point resumes with every round logged once.
    """

    def __init__(self, cfg: FedConfig, run: RunDir, model: UNet, diffusion: Diffusion,
                 grid: MeteredGrid, ledger: CommLedger, run_id: int = 0, split: SplitServer | None = None,
                 server_state: Callable[[], dict[str, object]] = dict) -> None:
        """``run_id``: the run the nodes keep their state under; ``server_state``: a checkpoint's extras."""
        self.cfg, self.run, self.model, self.diffusion = cfg, run, model, diffusion
        self.split = split
        self.server_state = server_state
        self.run_id = run_id
        self.grid, self.ledger = grid, ledger
        self.device = pick_device(cfg.train.device)
        self.clock = RoundClock()
        self.rows: list[Row] = []
        self.tracker = Tracker.for_run(run.path, cfg)  # TensorBoard, fed the rows as they are logged
        self.client_grids: dict[int, Path] = {}  # this round's grid of each client's own model
        self.label_plot_done = False
        self.strategy_metrics: dict[tuple[int, str], dict[str, object]] = {}
        self.meter = QualityMeter(cfg, self.device)
        # A global model's EMA is the server's (fedapp.train.ema); clients keep their own models' EMAs.
        keeps_ema = bool(cfg.train.ema_decay) and not clients_own_models(cfg.strategy.name)
        self.ema = RoundEMA(model, cfg.train) if keeps_ema else None
        self.averaged = copy.deepcopy(model) if keeps_ema else model

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            self.clock.restart()
            return None
        now = time.perf_counter()
        train = self._aggregate(server_round, MessageType.TRAIN)
        if not train and not self.grid.round_metrics(server_round, MessageType.TRAIN):
            self._stop_without_updates(server_round)  # replies that came but were dropped keep the model instead
        load_record(self.model, arrays)
        if self.ema is not None and train:
            self.ema.update(self.model, round(float(train.get("train-steps", 1.0))))
        self._plot_labels_once(server_round)
        row = self.clock.new_row(server_round, now, train=train,
                                 evaluate=self._aggregate(server_round, MessageType.EVALUATE),
                                 comm=self.ledger.round_summary(server_round))
        if self.split is not None:
            row["collafuse"] = self.split.round_report(server_round)
        if clients_own_models(self.cfg.strategy.name) and (per_client := self._per_client(server_round)):
            row["per_client"] = per_client
        if self.cfg.eval.is_eval_round(server_round, self.cfg.train.rounds):
            quality, grid_path = self._quality(server_round, row["evaluate"])  # type: ignore[arg-type]
            if quality:
                row["quality"] = quality
            if grid_path.exists():
                row["samples"] = str(grid_path.relative_to(self.run.path))
            if self.client_grids:
                row["client_samples"] = {str(pid): str(p.relative_to(self.run.path))
                                         for pid, p in sorted(self.client_grids.items())}
        close_round(self.run, self.cfg, self.model, self.rows, row, now, tracker=self.tracker,
                    extra={"comm": self.ledger.rows(), **self.server_state()}, ema=self.ema_state())
        self.run.append_jsonl(
            self.run.comm_path, [t for t in self.ledger.rows() if t["server_round"] == server_round]
        )
        self.clock.lap()
        cum = self.ledger.totals(upto=server_round)
        log(INFO, "%s", summary_line(row, self.cfg.train.rounds, cum["down_wire"] + cum["up_wire"]))
        return MetricRecord({"cum-down-bytes": cum["down_bytes"], "cum-up-bytes": cum["up_bytes"],
                             "cum-down-wire": cum["down_wire"], "cum-up-wire": cum["up_wire"]})

    def take_metrics(self, server_round: int, message_type: str, metrics: MetricRecord | None) -> None:
        """What the strategy aggregated from the replies it kept: the row reports these, not every reply."""
        self.strategy_metrics[(server_round, message_type)] = dict(metrics or {})

    def _aggregate(self, server_round: int, message_type: str) -> dict[str, float]:
        if (server_round, message_type) in self.strategy_metrics:
            merged = self.strategy_metrics.pop((server_round, message_type))
            return {k: v for k, v in merged.items() if k not in IDENTIFIERS and isinstance(v, int | float)}
        contents = [c for c in self.grid.round_metrics(server_round, message_type)
                    if len(c.metric_records) == 1 and is_count(next(iter(c.metric_records.values())).get(NUM_EXAMPLES))]
        personal = message_type == MessageType.EVALUATE and clients_own_models(self.cfg.strategy.name)
        canonical_metrics(contents, common=not personal)
        if not contents:
            return {}
        merged = (mean_std_over_clients if personal else weighted_mean_over_clients)(contents, NUM_EXAMPLES)
        return {k: v for k, v in merged.items() if not isinstance(v, list)}  # both leave the identifiers out

    def _per_client(self, server_round: int) -> dict[str, dict[str, dict[str, float]]]:
        """Each replying client's own finite figures, by partition id and phase (where clients own models).

        The row's train and evaluate entries are the mean over the replies the strategy kept; these
        are the replies themselves, so a client's curve can be read beside the mean.
        """
        out: dict[str, dict[str, dict[str, float]]] = {}
        for phase in (MessageType.TRAIN, MessageType.EVALUATE):
            for content in self.grid.round_metrics(server_round, phase):
                if len(content.metric_records) != 1:
                    continue
                metrics = next(iter(content.metric_records.values()))
                pid = metrics.get(PARTITION_ID)
                if not is_count(metrics.get(NUM_EXAMPLES)) or not (is_count(pid) or pid == 0):
                    continue
                out.setdefault(str(int(pid)), {})[phase] = {  # type: ignore[arg-type]
                    k: float(v) for k, v in metrics.items() if k not in (*IDENTIFIERS, NUM_EXAMPLES)
                    and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
        return dict(sorted(out.items(), key=lambda item: int(item[0])))

    def _stop_without_updates(self, server_round: int) -> None:
        """Rounds with no model from any client would only repeat the failure; stop with its reason."""
        errors = self.grid.round_errors(server_round, MessageType.TRAIN)
        reason = errors[0][1].strip().splitlines()[-1] if errors else "no client replied"
        node = f" (node {errors[0][0]}, {len(errors)} failed)" if errors else ""
        message = f"round {server_round}: no client returned a model{node}: {reason}"
        log(ERROR, "%s", message)
        raise SystemExit(f"fedapp: {message}")

    def restore(self, rows: list[dict[str, object]]) -> None:
        """Continue after a checkpoint's rows: the logs hold exactly them, and the clock goes on from there."""
        self.rows = list(rows)
        done = int(rows[-1]["round"]) if rows else 0  # type: ignore[call-overload]
        self.run.rewrite_jsonl(self.run.metrics_path, self.rows)
        self.run.rewrite_jsonl(self.run.comm_path, [t for t in self.ledger.rows() if t["server_round"] <= done])  # type: ignore[operator]
        self.clock.resume(self.rows)  # type: ignore[arg-type]
        self.label_plot_done = self.run.label_plot_path.exists()

    def ema_state(self) -> dict[str, object] | None:
        """The server's EMA of its model, as checkpoints hold it (None without one): the global
        model's, or CollaFuse's shared model's, which the strategy keeps over its every step."""
        if self.split is not None:
            return self.split.ema_state()
        return ema_state(self.ema, self.model) if self.ema is not None else None

    def restore_ema(self, state: dict[str, object] | None) -> None:
        if self.split is not None:
            self.split.restore_ema(state)
        elif self.ema is not None and state is not None:
            load_ema(self.ema, self.model, state)

    def sampling_model(self) -> UNet:
        """What the global model samples and is scored with: its EMA when the server keeps one."""
        if self.ema is None:
            return self.model
        self.ema.copy_to(self.averaged.parameters())
        return self.averaged

    def client_models(self) -> dict[int, dict[str, torch.Tensor]]:
        """Each client's own model, by partition id, where this machine can see the nodes' disks."""
        if not clients_own_models(self.cfg.strategy.name):
            return {}
        return collect_node_models(state_root(self.cfg.train.node_state_dir), self.run_id)

    def _quality(self, server_round: int, evaluate: dict[str, float]) -> tuple[dict[str, object], Path]:
        """Metrics and grid: the global model's here, or the clients' own (they score themselves)."""
        ev = self.cfg.eval
        path = self.run.samples_path(server_round)
        quality: dict[str, object] = {}
        self.client_grids = {}
        if self.split is not None:
            quality.update(self._client_scores(evaluate))
            self._split_grids(server_round, path)
        elif not is_personalized(self.cfg.strategy.name):
            scores, samples = self._measure(self.sampling_model(), ev.num_samples)
            save_grid(samples, path)
            quality.update(scores)
        else:
            quality.update(self._client_scores(evaluate))
            clients = self.client_models()
            if clients:
                per_client = max(1, ev.num_samples // len(clients))
                personal = copy.deepcopy(self.model)
                rows = []
                for pid, state in sorted(clients.items()):
                    personal.load_state_dict(state)
                    rows.append(self.meter.draw(personal, self.diffusion, per_client))
                    self.client_grids[pid] = save_grid(rows[-1], path.with_name(f"{path.stem}-client-{pid}.png"))
                save_grid(torch.cat(rows), path, nrow=per_client)
            else:
                log(WARNING, "no client model is visible from the server; no sample grid for round %d",
                    server_round)
        if any(k in quality for k in METRIC_NAMES):
            quality.update(quality_entry(self.cfg, {}, self._anchors()))
        return quality, path

    @staticmethod
    def _client_scores(evaluate: dict[str, float]) -> dict[str, object]:
        """The clients' own Fréchet scores (mean and std over clients), moved out of the evaluate row."""
        quality: dict[str, object] = {k: evaluate.pop(k) for k in list(evaluate) if k.removesuffix("-std") in QUALITY_NAMES}
        if quality:
            quality["clients"] = evaluate.get("clients", 0.0)
        return quality

    def _split_grids(self, server_round: int, path: Path) -> None:
        """One grid per client of its split-inference samples, and all of them a row each in ``path``."""
        assert self.split is not None
        samples = self.split.client_samples(server_round)
        if not samples:
            log(WARNING, "no client returned split-inference samples in round %d", server_round)
            return
        for pid, images in samples.items():
            self.client_grids[pid] = save_grid(images, path.with_name(f"{path.stem}-client-{pid}.png"))
        per_row = min(len(images) for images in samples.values())
        save_grid(torch.cat([images[:per_row] for images in samples.values()]), path, nrow=per_row)

    def _anchors(self) -> dict[str, dict[str, float]]:
        """The noise and real-image anchors of the metrics, where this server can measure them."""
        try:
            return self.meter.anchors
        except DatasetNotFoundError as err:
            log(WARNING, "no anchors for the Fréchet metrics: the server has no real data (%s)", err)
            return {}

    def _measure(self, model: UNet, keep: int) -> tuple[dict[str, float], torch.Tensor]:
        """A metric that cannot run here (no real data on this server) is skipped, not fatal."""
        try:
            return self.meter.measure(model, self.diffusion, keep=keep)
        except DatasetNotFoundError as err:
            log(WARNING, "Fréchet metrics skipped: the server has no real data for the statistics (%s)", err)
            self.meter.spaces.clear()
            return {}, self.meter.draw(model, self.diffusion, keep)

    def _plot_labels_once(self, server_round: int) -> None:
        """The clients report num-partitions, so the plot matches the real split."""
        if self.label_plot_done:
            return
        reported = {
            int(m["metrics"][NUM_PARTITIONS])  # type: ignore[arg-type]
            for m in self.grid.round_metrics(server_round, MessageType.TRAIN)
            if "metrics" in m.metric_records and is_count(m["metrics"].get(NUM_PARTITIONS))
            and m["metrics"][NUM_PARTITIONS] <= self.cfg.strategy.max_num_examples  # type: ignore[operator]
        }
        if not reported:
            return
        self.label_plot_done = True
        num = max(reported)
        try:
            partitioner = pool_partitioner(self.cfg.data, self.cfg.seed, num)
        except DatasetNotFoundError as err:
            log(WARNING, "label-distribution plot skipped: the server has no copy of the data (%s)", err)
            return
        title = f"{self.cfg.data.name}, {self.cfg.data.partitioner}, {num} clients"
        path = plot_label_distribution(partitioner, self.run.label_plot_path, title,
                                       CLASS_NAMES.get(self.cfg.data.name))
        log(INFO, "label distribution: %s", path)

