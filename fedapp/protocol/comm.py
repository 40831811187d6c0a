"""Communication measured on the records that were actually sent and received."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Literal

from flwr.app import RecordDict

from fedapp.model.unet import part_of
from fedapp.protocol.packing import packed_copy
from fedapp.protocol.records import content_size, wire_bytes

Direction = Literal["down", "up"]
_FIELDS = ("down_params", "down_bytes", "down_wire", "up_params", "up_bytes", "up_wire")


@dataclass(frozen=True)
class Transfer:
    """One message: values and payload bytes of its ArrayRecords, and its serialized size.

    ``wire`` is the whole content as Flower sends it (object heads, config and metrics
    included), so ``wire / params`` shows the transport dtype and the framing together.
    """

    server_round: int
    node_id: int
    direction: Direction
    message_type: str
    params: int
    bytes: int
    parts: tuple[str, ...] = ()
    wire: int = 0


class CommLedger:
    """Every transfer of a run, with per-round, per-client and cumulative totals."""

    def __init__(self) -> None:
        self.transfers: list[Transfer] = []

    @classmethod
    def from_rows(cls, rows: list[dict[str, object]]) -> CommLedger:
        """A ledger from ``rows()`` (a checkpoint's), so a resumed run keeps counting from there."""
        ledger = cls()
        ledger.transfers = [Transfer(**{**row, "parts": tuple(row.get("parts", ()))}) for row in rows]  # type: ignore[arg-type, call-overload]
        return ledger

    def add(self, server_round: int, node_id: int, direction: Direction, message_type: str,
            content: RecordDict | None, packed: bool = False) -> Transfer:
        """``packed``: the content travelled packed (``transport.pack``), so ``wire`` is its packed size."""
        params, nbytes = content_size(content) if content is not None else (0, 0)
        wire = wire_bytes(packed_copy(content) if packed else content) if content is not None else 0
        transfer = Transfer(server_round, node_id, direction, message_type, params, nbytes, _parts(content), wire)
        self.transfers.append(transfer)
        return transfer

    @staticmethod
    def _empty() -> dict[str, int]:
        return dict.fromkeys(_FIELDS, 0)

    def _sum(self, keep: list[Transfer]) -> dict[str, int]:
        out = self._empty()
        for t in keep:
            out[f"{t.direction}_params"] += t.params
            out[f"{t.direction}_bytes"] += t.bytes
            out[f"{t.direction}_wire"] += t.wire
        return out

    def totals(self, server_round: int | None = None, upto: int | None = None,
               message_type: str | None = None) -> dict[str, int]:
        """Sum for one round, or for rounds <= ``upto``; optionally one message type."""
        keep = [
            t for t in self.transfers
            if (server_round is None or t.server_round == server_round)
            and (upto is None or t.server_round <= upto)
            and (message_type is None or t.message_type == message_type)
        ]
        return self._sum(keep)

    def per_client(self, server_round: int) -> dict[int, dict[str, int]]:
        groups: dict[int, list[Transfer]] = defaultdict(list)
        for t in self.transfers:
            if t.server_round == server_round:
                groups[t.node_id].append(t)
        return {node: self._sum(ts) for node, ts in sorted(groups.items())}

    def message_types(self) -> list[str]:
        return sorted({t.message_type for t in self.transfers})

    def round_summary(self, server_round: int) -> dict[str, object]:
        """What a metrics row records: this round and cumulative, per message type."""
        return {
            mtype: {
                "round": self.totals(server_round, message_type=mtype),
                "cumulative": self.totals(upto=server_round, message_type=mtype),
            }
            for mtype in self.message_types()
        } | {"per_client": {str(k): v for k, v in self.per_client(server_round).items()}}

    def rows(self) -> list[dict[str, object]]:
        return [asdict(t) for t in self.transfers]


def _parts(content: RecordDict | None) -> tuple[str, ...]:
    """Which UNet parts a message carried ('other' for arrays that are not UNet parameters)."""
    found: set[str] = set()
    for record in (content.array_records.values() if content is not None else ()):
        for key in record.keys():
            try:
                found.add(part_of(key))
            except KeyError:
                found.add("other")
    return tuple(sorted(found))


def format_summary(ledger: CommLedger) -> str:
    """A small table of totals per message type (wire MB: as serialized), for the end-of-run log."""
    lines = [f"{'messages':<12}{'down params':>16}{'down wire MB':>14}{'up params':>16}{'up wire MB':>14}"]
    for mtype in [*ledger.message_types(), None]:
        t = ledger.totals(message_type=mtype)
        lines.append(
            f"{mtype or 'all':<12}{t['down_params']:>16,}{t['down_wire'] / 1e6:>14.2f}"
            f"{t['up_params']:>16,}{t['up_wire'] / 1e6:>14.2f}"
        )
    return "\n".join(lines)
