"""A Grid that records every message's payload and keeps the round's replies."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedapp.comm import CommLedger


class MeteredGrid(Grid):
    """Wraps the real Grid; strategies use it unchanged.

    Downloads are metered as sent, uploads as received, both attributed to the round
    named in the outgoing ConfigRecord's ``server-round`` (the last one seen otherwise).
    """

    def __init__(self, inner: Grid, ledger: CommLedger) -> None:
        self.inner = inner
        self.ledger = ledger
        self.current_round = 0
        # Only the metrics of replies are kept: arrays would pile up over the rounds.
        self.metrics: dict[tuple[int, str], list[RecordDict]] = defaultdict(list)
        self.errors: dict[tuple[int, str], list[tuple[int, str]]] = defaultdict(list)

    # -- delegation -------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self):  # type: ignore[no-untyped-def]
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._sent(messages)
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.inner.pull_messages(message_ids))
        self._received(replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self._sent(messages)
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        self._received(replies)
        return replies

    # -- metering ---------------------------------------------------------------------
    def _sent(self, messages: list[Message]) -> None:
        for msg in messages:
            for record in msg.content.config_records.values():
                if "server-round" in record:
                    self.current_round = int(record["server-round"])  # type: ignore[arg-type]
            self.ledger.add(self.current_round, msg.metadata.dst_node_id, "down",
                            msg.metadata.message_type, msg.content)

    def _received(self, replies: list[Message]) -> None:
        for reply in replies:
            content = None if reply.has_error() else reply.content
            self.ledger.add(self.current_round, reply.metadata.src_node_id, "up",
                            reply.metadata.message_type, content)
            key = (self.current_round, reply.metadata.message_type)
            if content is not None:
                self.metrics[key].append(RecordDict(dict(content.metric_records)))
            else:
                self.errors[key].append((reply.metadata.src_node_id, reply.error.reason))

    def round_metrics(self, server_round: int, message_type: str) -> list[RecordDict]:
        """The MetricRecords of the round's successful replies of one message type."""
        return list(self.metrics.get((server_round, message_type), []))

    def round_errors(self, server_round: int, message_type: str) -> list[tuple[int, str]]:
        """(node id, reason) of the round's errored replies of one message type."""
        return list(self.errors.get((server_round, message_type), []))
