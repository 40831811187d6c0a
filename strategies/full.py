"""FedDiffuse's "Full" method: FedAvg over every UNet parameter, of the replies that pass the checks."""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedapp.log import log
from strategies.base import FedappStrategy
from strategies.robust import robust_record
from strategies.validation import by_node, canonical_metrics, canonical_reply, check_reply


class Full(FedappStrategy):
    """Example-weighted FedAvg of the whole model (``num-examples`` weights).

    The baseline whose communication the sub-block methods cut down. Before averaging it
    drops replies that do not fit the global model, hold NaN/Inf or claim too many examples.
    """

    method = "full"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._sent: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._shapes = {k: tuple(v.shape) for k, v in arrays.items()}
        self._sent = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = by_node(replies)
        answered = [m for m in replies if not m.has_error()]
        shapes = self._reference(answered)
        kept = [m for m in replies if m.has_error() or self._valid(m, shapes)]
        valid = len([m for m in kept if not m.has_error()])
        if self.too_few_valid(server_round, len(answered), valid):
            return None, None
        canonical_metrics([m.content for m in kept if not m.has_error()])
        if self.aggregation == "mean":
            return super().aggregate_train(server_round, kept)
        good, _ = self._check_and_log_replies(kept, is_train=True)
        if not good:
            return None, None
        if self.privacy is not None and self._sent is not None:
            self.privacy.clip_replies(good, self._sent, self.arrayrecord_key)
        contents = [m.content for m in good]
        arrays = robust_record([c[self.arrayrecord_key] for c in contents], self.aggregation, self.trim_fraction)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        if self.privacy is None:
            return arrays, metrics
        return ArrayRecord(self.privacy.noised(arrays, len(good))), self.privacy.released(metrics)

    def _reference(self, answered: list[Message]) -> dict[str, tuple[int, ...]]:
        """The global keys and shapes; without a configured round (a direct call), the first reply's."""
        if self._shapes is not None:
            return self._shapes
        if answered and self.arrayrecord_key in answered[0].content.array_records:
            return {k: tuple(v.shape) for k, v in answered[0].content[self.arrayrecord_key].items()}
        return {}

    def _valid(self, reply: Message, shapes: dict[str, tuple[int, ...]]) -> bool:
        """Checked on its decoded bytes; a valid reply is then made to hold exactly what passed."""
        problem, tensors = check_reply(reply.content, shapes, arrays_key=self.arrayrecord_key,
                                       weighted_by_key=self.weighted_by_key, max_examples=self.max_num_examples)
        if problem:
            log(WARNING, "dropping reply from node %d: %s", reply.metadata.src_node_id, problem)
            return False
        canonical_reply(reply.content, self.arrayrecord_key, tensors)
        return True
