"""A Grid that records every message's payload and keeps the round's replies."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from logging import WARNING

from flwr.app import Message, Metadata, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid

from fedapp.log import log
from fedapp.protocol.comm import CommLedger
from fedapp.protocol.keys import SERVER_ROUND
from server_app.grid_wrapper import GridWrapper


class MeteredGrid(GridWrapper):
    """Wraps the real Grid; strategies use it unchanged.

    Downloads are metered as sent, uploads as received, both attributed to the round
    named in the outgoing ConfigRecord's ``server-round`` (the last one seen otherwise).
    A reply is attributed to the node its message went to: the error replies the SuperLink
    writes itself (a node gone, a message expired) come from node 1, the SuperLink.
    """

    def __init__(self, inner: Grid, ledger: CommLedger, packed: bool = False) -> None:
        """``packed``: a PackedGrid below packs what goes out (and honest nodes what comes back), so
        the ledger's ``wire`` is taken on the packed form; params and bytes on the arrays themselves."""
        super().__init__(inner)
        self.ledger, self.packed = ledger, packed
        self.current_round = 0
        # Only the metrics of replies are kept: arrays would pile up over the rounds.
        self.metrics: dict[tuple[int, str], list[RecordDict]] = defaultdict(list)
        self.errors: dict[tuple[int, str], list[tuple[int, str]]] = defaultdict(list)
        # Metadata of messages sent since the last replies (not the messages: their arrays would pile
        # up); the ids are set when the messages are pushed, so they are read when replies come.
        self.pending: list[Metadata] = []
        self.destination: dict[str, int] = {}  # message id -> the node it went to

    def _node(self, reply: Message) -> int:
        """The node a reply answers for, also when the SuperLink wrote it."""
        if reply.metadata.src_node_id != SUPERLINK_NODE_ID:
            return reply.metadata.src_node_id
        return self.destination.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def outgoing(self, messages: list[Message]) -> list[Message]:
        self.pending += [msg.metadata for msg in messages]
        for msg in messages:
            for record in msg.content.config_records.values():
                if SERVER_ROUND in record:
                    self.current_round = int(record[SERVER_ROUND])  # type: ignore[arg-type]
            self.ledger.add(self.current_round, msg.metadata.dst_node_id, "down",
                            msg.metadata.message_type, msg.content, self.packed)
        return messages

    def incoming(self, replies: list[Message]) -> list[Message]:
        self.destination.update({meta.message_id: meta.dst_node_id for meta in self.pending})
        self.pending.clear()
        for reply in replies:
            content = None if reply.has_error() else reply.content
            node = self._node(reply)
            self.ledger.add(self.current_round, node, "up", reply.metadata.message_type, content, self.packed)
            key = (self.current_round, reply.metadata.message_type.split(".")[0])  # named actions too
            if content is not None:
                self.metrics[key].append(RecordDict(dict(content.metric_records)))
            else:
                self.errors[key].append((node, reply.error.reason))
        return replies

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> Iterable[Message]:
        """As the inner Grid's; a node whose reply did not come within ``timeout`` is named in the log."""
        messages = list(messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        answered = {reply.metadata.reply_to_message_id for reply in replies}
        for msg in messages if timeout is not None else []:
            if msg.metadata.message_id not in answered:
                kind = msg.metadata.message_type.split(".")[0]
                reason = f"no reply within strategy.round-timeout = {timeout:g} s"
                log(WARNING, "round %d: node %d dropped from the %s phase: %s", self.current_round,
                    msg.metadata.dst_node_id, kind, reason)
                self.errors[(self.current_round, kind)].append((msg.metadata.dst_node_id, reason))
        return replies

    def round_metrics(self, server_round: int, message_type: str) -> list[RecordDict]:
        """The MetricRecords of the round's successful replies of one category ('train', 'evaluate')."""
        return list(self.metrics.get((server_round, message_type), []))

    def round_errors(self, server_round: int, message_type: str) -> list[tuple[int, str]]:
        """(node id, reason) of the round's errored replies of one message type."""
        return list(self.errors.get((server_round, message_type), []))
