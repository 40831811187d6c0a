"""What each FedDiffuse method exchanges, and what that costs, without any Flower code.

The strategies (server) and the ClientApp (client) both read these tables, so the two
sides can never disagree about which UNet parts travel and which stay private.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedapp.model.unet import PART_NAMES

ALL_PARTS: tuple[str, ...] = PART_NAMES  # ("encoder", "bottleneck", "decoder")

# Parts the server sends down each round (after a node's first round, which is always whole).
SHARED_PARTS: dict[str, tuple[str, ...]] = {
    "full": ALL_PARTS,
    "usplit": ALL_PARTS,
    "ulatdec": ("bottleneck", "decoder"),
    "udec": ("decoder",),
}
METHODS: tuple[str, ...] = tuple(SHARED_PARTS)


def private_parts(method: str) -> tuple[str, ...]:
    """Parts a client keeps to itself across rounds (never sent after its first round)."""
    return tuple(p for p in ALL_PARTS if p not in SHARED_PARTS.get(method, ALL_PARTS))


def is_personalized(method: str) -> bool:
    """Methods where each client ends with its own model."""
    return bool(private_parts(method))


def clients_own_models(method: str) -> bool:
    """Methods that end with a model per client, scored by each client (CollaFuse's split ones too)."""
    return is_personalized(method) or method == "collafuse"


def usplit_assignment(node_ids: Sequence[int], rng: random.Random) -> dict[int, tuple[str, ...]]:
    """One round's USplit reporting tasks.

    Clients are paired at random; in a pair one reports the encoder and the other the
    decoder, and the bottleneck goes to one of the two. With an odd count, the last
    client reports the bottleneck plus the encoder or the decoder; a lone client reports
    everything.
    """
    order = list(node_ids)
    rng.shuffle(order)
    if len(order) == 1:
        return {order[0]: ALL_PARTS}
    tasks: dict[int, tuple[str, ...]] = {}
    for a, b in zip(order[0::2], order[1::2]):
        enc, dec = (a, b) if rng.random() < 0.5 else (b, a)
        with_bottleneck = enc if rng.random() < 0.5 else dec
        tasks[enc] = ("encoder", "bottleneck") if with_bottleneck == enc else ("encoder",)
        tasks[dec] = ("bottleneck", "decoder") if with_bottleneck == dec else ("decoder",)
    if len(order) % 2:
        tasks[order[-1]] = ("bottleneck", rng.choice(["encoder", "decoder"]))
    return {node: tuple(p for p in ALL_PARTS if p in parts) for node, parts in tasks.items()}


def parts_keys(parts: Sequence[str], part_keys: Mapping[str, Sequence[str]]) -> list[str]:
    """State-dict keys of ``parts``, in state-dict order."""
    return [k for p in ALL_PARTS if p in parts for k in part_keys[p]]


def shared_keys(method: str, part_keys: Mapping[str, Sequence[str]]) -> list[str]:
    """State-dict keys a FedDiffuse method sends every round (a delta payload's reference chain)."""
    return parts_keys(SHARED_PARTS[method], part_keys)


@dataclass(frozen=True)
class RoundCost:
    """Parameters moved in one round, over all clients (USplit's odd client: expectation)."""

    down: float
    up: float


def round_cost(method: str, sizes: Mapping[str, int], clients: int, first_round: bool) -> RoundCost:
    """Analytic parameters exchanged in one training round, all clients taking part."""
    if method not in SHARED_PARTS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    whole = sum(sizes[p] for p in ALL_PARTS)
    shared = sum(sizes[p] for p in SHARED_PARTS[method])
    down = clients * (whole if first_round else shared)
    if method == "usplit":
        if clients == 1:
            up: float = whole
        else:
            up = (clients // 2) * whole
            if clients % 2:
                up += sizes["bottleneck"] + (sizes["encoder"] + sizes["decoder"]) / 2
    else:
        up = clients * shared
    return RoundCost(down=down, up=up)


def cumulative_cost(method: str, sizes: Mapping[str, int], clients: int, rounds: int) -> list[float]:
    """Cumulative parameters (down + up) after each of ``rounds`` rounds."""
    total, out = 0.0, []
    for r in range(1, rounds + 1):
        cost = round_cost(method, sizes, clients, first_round=r == 1)
        total += cost.down + cost.up
        out.append(total)
    return out
