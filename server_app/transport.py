"""The wire format of model arrays: narrow floats out, float32 back in before any averaging."""

from __future__ import annotations

from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from fedapp.config import TransportDtype
from fedapp.protocol.comm import CommLedger
from fedapp.protocol.records import recast_record, record_dtypes
from server_app.grid_wrapper import GridWrapper
from server_app.metering import MeteredGrid


class TransportGrid(GridWrapper):
    """Casts the ArrayRecords of outgoing messages to ``dtype`` and widens replies to float32.

    It sits between the strategy and the metering, so the strategy averages float32 arrays
    and the ledger counts what actually travels.
    """

    def __init__(self, inner: Grid, dtype: TransportDtype) -> None:
        super().__init__(inner)
        self.dtype = dtype

    def outgoing(self, messages: list[Message]) -> list[Message]:
        if self.dtype == "float32":
            return messages
        # Strategies put one ArrayRecord object in many messages: cast each object once.
        cast: dict[int, ArrayRecord] = {}
        for msg in messages:
            for key, record in list(msg.content.array_records.items()):
                if id(record) not in cast:
                    cast[id(record)] = recast_record(record, self.dtype)
                msg.content[key] = cast[id(record)]
        return messages

    def incoming(self, replies: list[Message]) -> list[Message]:
        if self.dtype == "float32":
            return replies
        for reply in replies:
            if reply.has_error():
                continue
            for key, record in list(reply.content.array_records.items()):
                # Only the agreed narrow type is widened: anything else reaches the strategy as sent.
                if record_dtypes(record) == {self.dtype}:
                    try:
                        reply.content[key] = recast_record(record, "float32")
                    except Exception:  # noqa: BLE001 - bytes that do not decode: the strategy drops it, with why
                        continue
        return replies


def server_grid(grid: Grid, ledger: CommLedger, dtype: TransportDtype) -> tuple[TransportGrid, MeteredGrid]:
    """(what the strategy talks to, the metering layer below it)."""
    metered = MeteredGrid(grid, ledger)
    return TransportGrid(metered, dtype), metered
