"""The wire format of model arrays: narrow floats, 8- or 4-bit codes, or deltas to a shared reference
out; float32 weights back in before any check or average.

The strategies never see the wire format: they send and receive float32 weights, and this layer
sits between them and the metering, so the ledger counts what actually travels.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, Metadata, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid

from fedapp.config import FedConfig, TransportConfig
from fedapp.model.unet import unet_parts
from fedapp.protocol.comm import CommLedger
from fedapp.protocol.delta import RESYNC, ReferenceChain, add_change, quantizer_for, state_digest
from fedapp.protocol.keys import ARRAYS, CONFIG, INIT_DIGEST, TRANSPORT, TRANSPORT_BASE, TRANSPORT_VERSION
from fedapp.protocol.methods import SHARED_PARTS, shared_keys
from fedapp.protocol.packing import PackingProblem, packed_form, unpack_content
from fedapp.protocol.records import ArrayProblem, decode_array, encode_state, recast_record, record_dtypes
from server_app.grid_wrapper import GridWrapper
from server_app.metering import MeteredGrid


class TransportGrid(GridWrapper):
    """Casts the ArrayRecords of outgoing messages to ``transport.dtype`` and widens replies to float32.

    Quantized arrays are rounded with a generator seeded by ``seed``, so a run repeats.
    """

    def __init__(self, inner: Grid, transport: TransportConfig, seed: int = 0) -> None:
        super().__init__(inner)
        self.transport, self.dtype = transport, transport.dtype
        self.generator_seed, self.casts = seed, 0

    def outgoing(self, messages: list[Message]) -> list[Message]:
        if self.dtype == "float32":
            return messages
        # Strategies put one ArrayRecord object in many messages: cast each object once.
        cast: dict[int, ArrayRecord] = {}
        for msg in messages:
            for key, record in list(msg.content.array_records.items()):
                if id(record) not in cast:
                    self.casts += 1
                    quantizer = quantizer_for(self.transport, self.generator_seed * 1_000_003 + self.casts)
                    cast[id(record)] = recast_record(record, self.dtype, quantizer)
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


def _error_reply(reply: Message, reason: str) -> Message:
    """The reply as an error, so the strategy logs ``reason`` and leaves the node out of the round."""
    return Message(metadata=reply.metadata, error=Error(code=ErrorCode.UNKNOWN, reason=reason))


class DeltaGrid(GridWrapper):
    """``transport.payload = "delta"``: model arrays travel as changes along a ``ReferenceChain``.

    It remembers which version each node holds (0, the seeded initialization, for a node it has
    not heard from), and counts a node as holding what it was sent only once the node replied.
    Arrays outside the chain (a personalized node's private parts, sent on its first round) travel
    whole, as the strategy sent them, unless they are the seeded initialization ``init``, which
    the node rebuilds: a run from a checkpoint starts every node's private parts from it.
    """

    def __init__(self, inner: Grid, transport: TransportConfig, chain: ReferenceChain, seed: int,
                 init: Mapping[str, torch.Tensor]) -> None:
        super().__init__(inner)
        self.transport, self.chain, self.seed = transport, chain, seed
        self.init = {k: v for k, v in init.items() if k not in chain.keys}
        self.held: dict[int, int] = {}  # node -> version it holds
        self.sent: dict[int, int] = {}  # node -> version of the message it was last sent
        self.pending: list[Metadata] = []  # read when replies come: the ids are set when pushed
        self.destination: dict[str, int] = {}

    def outgoing(self, messages: list[Message]) -> list[Message]:
        followed: set[tuple[int, ...]] = set()
        for msg in messages:
            if ARRAYS not in msg.content.array_records:
                continue
            record = msg.content[ARRAYS]
            missing = [k for k in self.chain.keys if k not in record]
            if missing:
                raise ValueError(f"a {msg.metadata.message_type} message lacks shared arrays {missing[:2]}")
            arrays = tuple(id(record[k]) for k in self.chain.keys)
            if arrays not in followed:  # one global model per batch of messages: follow it once
                self.chain.follow({k: decode_array(record[k]) for k in self.chain.keys}, self.transport, self.seed)
                followed.add(arrays)
            node = msg.metadata.dst_node_id
            down, base = self.chain.message(self.held.get(node, 0))
            down = self._with_private(down, record)
            config = {**dict(msg.content.config_records.get(CONFIG, ConfigRecord())),
                      TRANSPORT_VERSION: self.chain.version, TRANSPORT_BASE: base}
            if base == 0:
                config[INIT_DIGEST] = self.chain.init_digest
            content = RecordDict({ARRAYS: down, CONFIG: ConfigRecord(config)})  # type: ignore[arg-type]
            for name, other in msg.content.items():
                if name not in content:
                    content[name] = other
            msg.content = content
            self.sent[node] = self.chain.version
        self.pending += [msg.metadata for msg in messages]
        return messages

    def _with_private(self, down: ArrayRecord, record: ArrayRecord) -> ArrayRecord:
        """``down`` plus the arrays of ``record`` outside the chain, whole, unless they are the seeded ones."""
        other = [k for k in record.keys() if k not in self.chain.keys]
        if not other:
            return down
        unknown = [k for k in other if k not in self.init]
        if unknown:
            raise ValueError(f"a message carries arrays the model does not have: {unknown[:2]}")
        sent = {k: decode_array(record[k]) for k in other}
        if state_digest(sent, other) == state_digest(self.init, other):
            return down
        return ArrayRecord({**dict(down.items()), **{k: record[k] for k in other}})

    def _node(self, reply: Message) -> int:
        if reply.metadata.src_node_id != SUPERLINK_NODE_ID:
            return reply.metadata.src_node_id
        return self.destination.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def incoming(self, replies: list[Message]) -> list[Message]:
        self.destination.update({meta.message_id: meta.dst_node_id for meta in self.pending})
        self.pending.clear()
        out = []
        for reply in replies:
            node = self._node(reply)
            if reply.has_error():
                self.held[node] = RESYNC  # it may hold anything now: the next message carries a version whole
                out.append(reply)
                continue
            if node in self.sent:
                self.held[node] = self.sent[node]
            out.append(self._weights(reply))
        return out

    def _weights(self, reply: Message) -> Message:
        """A train reply's update added back to the version it is on: float32 weights, as sent before."""
        content = reply.content
        if ARRAYS not in content.array_records:
            return reply
        stated = content.config_records.get(TRANSPORT, ConfigRecord()).get(TRANSPORT_BASE)
        if stated != self.chain.version:
            return _error_reply(reply, f"its update is on transport version {stated!r}, the server's is "
                                       f"{self.chain.version} (a delta payload needs both ends on one chain)")
        try:
            weights = add_change(self.chain.reference, content[ARRAYS])
        except ArrayProblem as err:
            return _error_reply(reply, f"dropped: {err}")
        content[ARRAYS] = encode_state(weights)
        del content[TRANSPORT]
        return reply


class PackedGrid(GridWrapper):
    """``transport.pack``: outgoing ArrayRecords joined into one object each, replies unpacked.

    It sits below the metering, so the ledger counts the arrays as the strategies know them (and their
    packed size as ``wire``); a reply whose packed record does not add up becomes an error reply naming why.
    """

    def __init__(self, inner: Grid, pack: bool) -> None:
        super().__init__(inner)
        self.pack = pack

    def outgoing(self, messages: list[Message]) -> list[Message]:
        if not self.pack:
            return messages
        # Strategies put one ArrayRecord object in many messages: pack each object once.
        packed: dict[int, ArrayRecord] = {}
        for msg in messages:
            for key, record in list(msg.content.array_records.items()):
                if id(record) not in packed:
                    packed[id(record)] = packed_form(record)
                msg.content[key] = packed[id(record)]
        return messages

    def incoming(self, replies: list[Message]) -> list[Message]:
        out = []
        for reply in replies:
            try:
                if not reply.has_error():
                    unpack_content(reply.content)
            except PackingProblem as err:
                reply = _error_reply(reply, f"dropped: {err}")
            out.append(reply)
        return out


def server_grid(grid: Grid, ledger: CommLedger, cfg: FedConfig,
                init: torch.nn.Module) -> tuple[TransportGrid | DeltaGrid, MeteredGrid]:
    """(what the strategy talks to, the metering layer below it); ``init`` is the seeded initial model."""
    metered = MeteredGrid(PackedGrid(grid, cfg.transport.pack), ledger, packed=cfg.transport.pack)
    if cfg.transport.payload == "delta" and cfg.strategy.name in SHARED_PARTS:
        state = init.state_dict()
        chain = ReferenceChain.start(state, shared_keys(cfg.strategy.name, unet_parts(state)))
        return DeltaGrid(metered, cfg.transport, chain, cfg.seed, state), metered
    return TransportGrid(metered, cfg.transport, cfg.seed), metered
