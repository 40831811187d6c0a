"""A Grid that records every message's payload and keeps the round's replies."""

from __future__ import annotations

from collections import defaultdict

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedapp.protocol.comm import CommLedger
from fedapp.protocol.keys import SERVER_ROUND
from server_app.grid_wrapper import GridWrapper


class MeteredGrid(GridWrapper):
    """Wraps the real Grid; strategies use it unchanged.

    Downloads are metered as sent, uploads as received, both attributed to the round
    named in the outgoing ConfigRecord's ``server-round`` (the last one seen otherwise).
    """

    def __init__(self, inner: Grid, ledger: CommLedger) -> None:
        super().__init__(inner)
        self.ledger = ledger
        self.current_round = 0
        # Only the metrics of replies are kept: arrays would pile up over the rounds.
        self.metrics: dict[tuple[int, str], list[RecordDict]] = defaultdict(list)
        self.errors: dict[tuple[int, str], list[tuple[int, str]]] = defaultdict(list)

    def outgoing(self, messages: list[Message]) -> list[Message]:
        for msg in messages:
            for record in msg.content.config_records.values():
                if SERVER_ROUND in record:
                    self.current_round = int(record[SERVER_ROUND])  # type: ignore[arg-type]
            self.ledger.add(self.current_round, msg.metadata.dst_node_id, "down",
                            msg.metadata.message_type, msg.content)
        return messages

    def incoming(self, replies: list[Message]) -> list[Message]:
        for reply in replies:
            content = None if reply.has_error() else reply.content
            self.ledger.add(self.current_round, reply.metadata.src_node_id, "up",
                            reply.metadata.message_type, content)
            key = (self.current_round, reply.metadata.message_type.split(".")[0])  # named actions too
            if content is not None:
                self.metrics[key].append(RecordDict(dict(content.metric_records)))
            else:
                self.errors[key].append((reply.metadata.src_node_id, reply.error.reason))
        return replies

    def round_metrics(self, server_round: int, message_type: str) -> list[RecordDict]:
        """The MetricRecords of the round's successful replies of one category ('train', 'evaluate')."""
        return list(self.metrics.get((server_round, message_type), []))

    def round_errors(self, server_round: int, message_type: str) -> list[tuple[int, str]]:
        """(node id, reason) of the round's errored replies of one message type."""
        return list(self.errors.get((server_round, message_type), []))
