"""A Grid that wraps another and sees every message going out and every reply coming in.

It also waits for replies itself: Flower's deployment Grid (``flwr.superlink.grid.http_grid``) looks
for replies every 3 s, fixed, so a reply that lands just after a look waits up to 3 s more, each
phase of each round. Here the SuperLink is asked every ``REPLY_POLL_S``; one small request each.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

REPLY_POLL_S = 0.2  # between two looks for replies (Flower's deployment Grid: 3 s; its simulation Grid: 0.1 s)


class GridWrapper(Grid):
    """Delegates to ``inner``; subclasses override :meth:`outgoing` and :meth:`incoming`."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    def outgoing(self, messages: list[Message]) -> list[Message]:
        return messages

    def incoming(self, replies: list[Message]) -> list[Message]:
        return replies

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
        return self.inner.push_messages(self.outgoing(list(messages)))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.incoming(list(self.inner.pull_messages(message_ids)))

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull until every message has its reply or ``timeout`` seconds have passed."""
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            arrived = list(self.pull_messages(waiting))
            replies += arrived
            waiting -= {reply.metadata.reply_to_message_id for reply in arrived}
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(REPLY_POLL_S)
        return replies
