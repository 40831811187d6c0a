"""FedDiffuse's sub-block methods: FedAvg that sends, collects and averages UNet parts.

The server always holds the whole model. Each round it sends every node the parts the
method shares (the whole model on a node's first round, so private parts start from the
global initialization), tells it in the train config which parts to report, and
averages each part over the nodes that reported it, weighted by their examples.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedapp.log import log
from fedapp.model.unet import unet_parts
from fedapp.protocol.keys import ARRAYS, REPORT_PARTS
from fedapp.protocol.methods import ALL_PARTS, SHARED_PARTS, is_personalized, parts_keys, usplit_assignment
from fedapp.protocol.metrics import mean_std_over_clients
from strategies.base import FedappStrategy, StrategyState
from strategies.robust import robust_record
from strategies.validation import by_node, canonical_metrics, canonical_reply, check_reply


class PartFedAvg(FedappStrategy):
    """Part-wise FedAvg; subclasses choose the method and, for USplit, the tasks."""

    method = "full"

    def __init__(self, *args: object, **kwargs: object) -> None:
        if is_personalized(self.method):
            kwargs.setdefault("evaluate_metrics_aggr_fn", mean_std_over_clients)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.tasks: dict[int, tuple[str, ...]] = {}
        self.initialized: set[int] = set()  # nodes that hold their private parts
        self._global: ArrayRecord | None = None
        self._keys: dict[str, list[str]] = {}

    def state(self) -> StrategyState:
        """What a resume needs beyond the weights: which nodes already hold their private parts."""
        return {**super().state(), "initialized": sorted(self.initialized)}

    def restore(self, state: StrategyState) -> None:
        super().restore(state)
        self.initialized = set(state.get("initialized", []))  # type: ignore[call-overload]

    def assign(self, server_round: int, node_ids: list[int]) -> dict[int, tuple[str, ...]]:
        """Which parts each node reports this round: the shared ones, by default."""
        return {node: SHARED_PARTS[self.method] for node in node_ids}

    def _down(self, arrays: ArrayRecord, node: int) -> ArrayRecord:
        if node not in self.initialized:
            return arrays
        return ArrayRecord({k: arrays[k] for k in parts_keys(SHARED_PARTS[self.method], self._keys)})

    def _tailor(self, messages: Iterable[Message], arrays: ArrayRecord,
                extra: dict[int, dict[str, str]] | None = None) -> list[Message]:
        """One message per node with its own arrays (and config additions)."""
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            config = ConfigRecord({**dict(msg.content[self.configrecord_key]), **(extra or {}).get(node, {})})
            content = RecordDict({self.arrayrecord_key: self._down(arrays, node), self.configrecord_key: config})
            out.append(Message(content=content, message_type=msg.metadata.message_type, dst_node_id=node))
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._global, self._keys = arrays, unet_parts(dict(arrays.items()))
        self.tasks = self.assign(server_round, [m.metadata.dst_node_id for m in messages])
        extra = {node: {REPORT_PARTS: ",".join(parts)} for node, parts in self.tasks.items()}
        return self._tailor(messages, arrays, extra)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        messages = super().configure_evaluate(server_round, arrays, config, grid)
        self._keys = unet_parts(dict(arrays.items()))
        return self._tailor(messages, arrays)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(by_node(replies), is_train=True, validate=False)
        good = [m for m in valid if self._reported_its_task(m)]
        if self.too_few_valid(server_round, len(valid), len(good)):
            return None, None
        if not good or self._global is None:
            return None, None
        canonical_metrics([m.content for m in good])
        if self.privacy is not None:
            self.privacy.clip_replies(good, self._global, self.arrayrecord_key)
        merged = {k: v for k, v in self._global.items()}
        for part in ALL_PARTS:
            reporters = [m for m in good if part in self.tasks[m.metadata.src_node_id]]
            if not reporters:
                continue
            keys = self._keys[part]
            subsets = [
                RecordDict({ARRAYS: ArrayRecord({k: m.content[self.arrayrecord_key][k] for k in keys}),
                            "metrics": m.content.metric_records[next(iter(m.content.metric_records))]})
                for m in reporters
            ]
            if self.aggregation == "mean":
                merged.update(aggregate_arrayrecords(subsets, self.weighted_by_key).items())
                continue
            part = robust_record([s[ARRAYS] for s in subsets], self.aggregation, self.trim_fraction)
            merged.update(self.privacy.noised(part, len(reporters)) if self.privacy is not None else part.items())
        self.initialized.update(m.metadata.src_node_id for m in good)
        metrics = self.train_metrics_aggr_fn([m.content for m in good], self.weighted_by_key)
        return ArrayRecord(merged), self.privacy.released(metrics) if self.privacy is not None else metrics

    def _reported_its_task(self, reply: Message) -> bool:
        """A reply must carry exactly its task's keys, in the global shapes, and a usable weight."""
        node = reply.metadata.src_node_id
        problem = self._task_problem(node, reply.content)
        if problem:
            log(WARNING, "dropping reply from node %d: %s", node, problem)
        return problem is None

    def _task_problem(self, node: int, content: RecordDict) -> str | None:
        """Checked on its decoded bytes; a valid reply is then made to hold exactly what passed."""
        if node not in self.tasks:
            return "the node had no task this round"
        if self._global is None:
            return "no round was configured"
        expected = {k: tuple(self._global[k].shape) for k in parts_keys(self.tasks[node], self._keys)}
        problem, tensors = check_reply(content, expected, arrays_key=self.arrayrecord_key,
                                       weighted_by_key=self.weighted_by_key, max_examples=self.max_num_examples)
        if problem:
            return f"{problem} (task {'+'.join(self.tasks[node])})"
        canonical_reply(content, self.arrayrecord_key, tensors)
        return None


class USplit(PartFedAvg):
    """Whole model down; each node reports a random part (pairs split encoder/decoder)."""

    method = "usplit"

    def __init__(self, *args: object, seed: int = 0, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.rng = random.Random(seed)

    def state(self) -> StrategyState:
        """Also the task generator, so a resumed run draws the tasks the uninterrupted one would."""
        return {**super().state(), "rng": self.rng.getstate()}

    def restore(self, state: StrategyState) -> None:
        super().restore(state)
        if "rng" in state:
            self.rng.setstate(state["rng"])  # type: ignore[arg-type]

    def assign(self, server_round: int, node_ids: list[int]) -> dict[int, tuple[str, ...]]:
        tasks = usplit_assignment(sorted(node_ids), self.rng)
        log(INFO, "USplit round %d tasks: %s", server_round, {n: "+".join(p) for n, p in tasks.items()})
        return tasks


class ULatDec(PartFedAvg):
    """Bottleneck + decoder shared; each client's encoder stays private."""

    method = "ulatdec"


class UDec(PartFedAvg):
    """Decoder shared; each client's encoder and bottleneck stay private."""

    method = "udec"
