"""Delta transport: arrays travel as the change to a reference both ends hold, so 8 or 4 bits are
spent on how much a round moved the model, not on the weights themselves.

The reference is a chain of versions over the arrays the method shares every round:

- **Version 0 is the seeded initialization.** Every node rebuilds it from ``seed``, so the first
  download costs no arrays (the server sends a digest of it, and the node checks its rebuild).
- **The server makes version v+1** when it sends a new global model G: it quantizes
  ``G − version v`` once, and version v+1 is version v plus exactly what that decodes to. A node
  that holds version v gets that delta; one that holds anything else gets version v+1 whole, in
  float32 (a resync: a node that missed a round, or every node after the server resumed).
  Both ends add the same float32 values to the same float32 reference, so they hold the same
  version bit for bit, and whatever of G a delta did not carry stays in ``G − reference`` and
  travels with the next one: the reference is the server's error feedback.
- **A client uploads** ``trained − version v`` (plus, with error feedback, what its previous
  upload's quantization dropped, kept on its disk), and the server adds it back to version v
  before any check or average, so the strategies see float32 weights as with any other payload.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord

from fedapp.config import TransportConfig
from fedapp.protocol.quantize import Quantizer
from fedapp.protocol.records import ArrayProblem, decode_checked, decode_record, encode_state

RESYNC = -1  # TRANSPORT_BASE of a message that carries its version whole


def state_digest(state: Mapping[str, torch.Tensor], keys: Iterable[str]) -> str:
    """A fingerprint of ``keys`` of a state as float32: names, shapes and every byte."""
    digest = hashlib.sha256()
    for key in keys:
        value = state[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{key}{tuple(value.shape)}".encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()[:32]


def quantizer_for(transport: TransportConfig, seed: int) -> Quantizer | None:
    """The quantizer of ``transport.dtype`` (None for floats), its stochastic rounding seeded by ``seed``."""
    if not transport.quantized:
        return None
    stochastic = transport.rounding == "stochastic"
    generator = torch.Generator().manual_seed(seed % 2**63) if stochastic else None
    return Quantizer(transport.dtype, transport.scales == "channel", stochastic, generator)  # type: ignore[arg-type]


def encode_change(change: Mapping[str, torch.Tensor], transport: TransportConfig,
                  seed: int) -> tuple[ArrayRecord, dict[str, torch.Tensor]]:
    """(``change`` as it travels, what the receiver decodes it to)."""
    record = encode_state(change, transport.dtype, quantizer_for(transport, seed))
    return record, decode_record(record)


def add_change(reference: Mapping[str, torch.Tensor], record: ArrayRecord) -> dict[str, torch.Tensor]:
    """A received change added to the reference; ArrayProblem names a bad or unknown array."""
    out = {}
    for key in record.keys():
        if key not in reference:
            raise ArrayProblem(f"array {key!r} is not one the method shares")
        try:
            out[key] = reference[key] + decode_checked(record[key], tuple(reference[key].shape))
        except ArrayProblem as err:
            raise ArrayProblem(f"array {key!r}: {err}") from None
    return out


@dataclass
class ReferenceChain:
    """The server's end of the chain: the newest version and the delta that made it."""

    keys: tuple[str, ...]
    reference: dict[str, torch.Tensor]
    init_digest: str  # version 0, which every node rebuilds
    version: int = 0
    target: str = ""  # digest of the global model the newest version stands for
    started: bool = False  # whether a global model was followed yet
    delta: ArrayRecord | None = field(default=None, repr=False)  # version - 1 -> version, as it travels

    @classmethod
    def start(cls, init: Mapping[str, torch.Tensor], keys: Iterable[str]) -> ReferenceChain:
        keys = tuple(keys)
        digest = state_digest(init, keys)
        return cls(keys, {k: init[k].detach().float().clone() for k in keys}, digest, target=digest)

    def follow(self, state: Mapping[str, torch.Tensor], transport: TransportConfig, seed: int) -> None:
        """Make the newest version stand for the global ``state`` (nothing to do if it already does).

        A first global model that is not the seeded initialization (a run from a checkpoint)
        becomes version 1 exactly, and every node gets it whole once.
        """
        digest = state_digest(state, self.keys)
        if digest == self.target:
            self.started = True
            return
        if not self.started:
            self.reference = {k: state[k].detach().float().clone() for k in self.keys}
            self.delta = None
        else:
            change = {k: state[k].float() - self.reference[k] for k in self.keys}
            self.delta, decoded = encode_change(change, transport, seed * 1_000_003 + self.version + 1)
            self.reference = {k: self.reference[k] + decoded[k] for k in self.keys}
        self.version += 1
        self.target, self.started = digest, True

    def message(self, held: int) -> tuple[ArrayRecord, int]:
        """(the arrays for a node that holds version ``held``, the version they apply to, RESYNC: none)."""
        if held == self.version:
            return ArrayRecord(), self.version
        if held == self.version - 1 and self.delta is not None:
            return self.delta, held
        return encode_state(self.reference), RESYNC

    def state(self) -> dict[str, object]:
        """What a resume needs (the delta is not: after a resume every node gets its version whole)."""
        return {"version": self.version, "target": self.target, "started": self.started,
                "reference": {k: v.clone() for k, v in self.reference.items()}}

    def restore(self, state: Mapping[str, object]) -> None:
        reference: dict[str, torch.Tensor] = state["reference"]  # type: ignore[assignment]
        if tuple(reference) != self.keys:
            raise ValueError("the checkpoint's transport reference holds other arrays than this method shares")
        self.reference, self.delta = dict(reference), None
        self.version, self.target = int(state["version"]), str(state["target"])  # type: ignore[call-overload]
        self.started = bool(state["started"])


def client_update(trained: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                  residual: Mapping[str, torch.Tensor] | None, keys: Iterable[str], transport: TransportConfig,
                  seed: int) -> tuple[ArrayRecord, dict[str, torch.Tensor]]:
    """(a client's upload of ``keys``: trained − reference + residual, the residual to keep after it).

    Without error feedback the residual is empty; with it, keys not sent keep theirs.
    """
    keys = list(keys)
    change = {k: trained[k].detach().float() - reference[k] for k in keys}
    if transport.error_feedback and residual:
        change = {k: v + residual[k] if k in residual else v for k, v in change.items()}
    record, decoded = encode_change(change, transport, seed)
    if not transport.error_feedback:
        return record, {}
    kept = {k: v for k, v in (residual or {}).items() if k not in change}
    return record, {**kept, **{k: change[k] - decoded[k] for k in keys}}
