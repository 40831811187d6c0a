"""Flower test doubles: mocked replies and an in-process Grid, without Ray.

flwr 1.41 reads ``TaskIdentity`` when a Message is built; outside a run it is unset,
so tests that build messages use the ``task_identity`` fixture from conftest.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Error, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

RUN_ID = 4242


def reply_from(node_id: int, content: RecordDict | None = None, error: Error | None = None,
               message_type: str = MessageType.TRAIN) -> Message:
    """A reply Message sent by ``node_id`` (content or error, not both)."""
    assert (content is None) != (error is None)
    instruction = Message(content=RecordDict(), dst_node_id=node_id, message_type=message_type)
    return Message(error if error is not None else content, reply_to=instruction)


class FakeGrid(Grid):
    """In-process Grid: every pushed message is answered by ``respond(message)``."""

    def __init__(self, node_ids: Iterable[int], respond: Callable[[Message], Message]) -> None:
        self.node_ids = list(node_ids)
        self.respond = respond
        self.sent: list[Message] = []
        # (message type, server-round at send time, destination): the config record is
        # reused and mutated by the strategy, so it is read when the message goes out.
        self.log: list[tuple[str, int | None, int]] = []
        self._pending: dict[str, Message] = {}
        self._run = Run.create_empty(RUN_ID)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = f"msg-{len(self.sent)}"
            msg.metadata.__dict__["_message_id"] = mid  # as Flower's grids set it when pushing
            self.sent.append(msg)
            config = msg.content.config_records.get("config")
            server_round = int(config["server-round"]) if config and "server-round" in config else None
            self.log.append((msg.metadata.message_type, server_round, msg.metadata.dst_node_id))
            self._pending[mid] = msg
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.respond(self._pending.pop(mid)) for mid in message_ids if mid in self._pending]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(self.push_messages(messages)))
