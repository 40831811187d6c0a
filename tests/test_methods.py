"""fedapp.protocol.methods: which parts each method shares, USplit's draw, and the communication count."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from fedapp.model.unet import UNet, part_sizes
from fedapp.protocol.methods import (
    ALL_PARTS,
    METHODS,
    SHARED_PARTS,
    cumulative_cost,
    is_personalized,
    parts_keys,
    private_parts,
    round_cost,
    usplit_assignment,
)

ENC, BOT, DEC = ALL_PARTS
PAIR_TASKS = {(ENC,), (ENC, BOT), (DEC,), (BOT, DEC)}


def reporters(tasks: dict[int, tuple[str, ...]]) -> Counter[str]:
    return Counter(part for parts in tasks.values() for part in parts)


# -- which parts travel ---------------------------------------------------------------------
def test_part_names_and_methods() -> None:
    assert ALL_PARTS == ("encoder", "bottleneck", "decoder")
    assert set(METHODS) == {"full", "usplit", "ulatdec", "udec"}


@pytest.mark.parametrize("method,private,personal", [
    ("full", (), False),
    ("usplit", (), False),
    ("ulatdec", ("encoder",), True),
    ("udec", ("encoder", "bottleneck"), True),
])
def test_private_parts_and_personalization(method: str, private: tuple[str, ...], personal: bool) -> None:
    assert private_parts(method) == private
    assert is_personalized(method) is personal
    assert set(private) | set(SHARED_PARTS[method]) == set(ALL_PARTS)
    assert not set(private) & set(SHARED_PARTS[method])


def test_shared_parts_table() -> None:
    assert SHARED_PARTS == {
        "full": ALL_PARTS,
        "usplit": ALL_PARTS,
        "ulatdec": ("bottleneck", "decoder"),
        "udec": ("decoder",),
    }


def test_parts_keys_follow_state_dict_order_whatever_the_order_asked() -> None:
    keys = {ENC: ["e1", "e2"], BOT: ["b1"], DEC: ["d1", "d2"]}
    assert parts_keys((DEC, ENC), keys) == ["e1", "e2", "d1", "d2"]
    assert parts_keys([BOT], keys) == ["b1"]
    assert parts_keys((), keys) == []
    assert parts_keys(ALL_PARTS, keys) == ["e1", "e2", "b1", "d1", "d2"]


# -- USplit's assignment --------------------------------------------------------------------
@pytest.mark.parametrize("k", range(1, 12))
def test_usplit_assignment_structure_over_many_seeds(k: int) -> None:
    nodes = [100 + 7 * i for i in range(k)]  # ids need not be 0..K-1
    for seed in range(500):
        given = list(nodes)
        tasks = usplit_assignment(given, random.Random(seed))
        assert given == nodes  # the caller's list is not shuffled in place
        assert sorted(tasks) == nodes
        for parts in tasks.values():
            assert parts, "every node reports something"
            assert set(parts) <= set(ALL_PARTS)
            assert list(parts) == [p for p in ALL_PARTS if p in parts]  # ALL_PARTS order, no repeats
        count = reporters(tasks)
        if k == 1:
            assert tasks == {nodes[0]: ALL_PARTS}
            continue
        assert all(count[p] >= 1 for p in ALL_PARTS)
        assert all(len(parts) <= 2 and parts != (ENC, DEC) for parts in tasks.values())
        assert count[ENC] + count[DEC] == k  # each node reports exactly one of the two ends
        if k % 2 == 0:
            assert count[ENC] == count[DEC] == count[BOT] == k // 2
            assert set(tasks.values()) <= PAIR_TASKS
        else:
            assert abs(count[ENC] - count[DEC]) == 1
            assert count[BOT] == (k - 1) // 2 + 1


def test_usplit_assignment_is_reproducible_from_the_rng() -> None:
    nodes = list(range(9))
    draws = [usplit_assignment(nodes, random.Random(42)) for _ in range(2)]
    assert draws[0] == draws[1]
    assert any(usplit_assignment(nodes, random.Random(s)) != draws[0] for s in range(5))


def test_usplit_roles_change_from_round_to_round() -> None:
    rng = random.Random(0)
    nodes = list(range(6))
    rounds = [usplit_assignment(nodes, rng) for _ in range(400)]
    for node in nodes:
        roles = Counter(tasks[node] for tasks in rounds)
        assert set(roles) == PAIR_TASKS, node  # every pair role turns up for every node
        encoder_share = sum(n for parts, n in roles.items() if ENC in parts) / len(rounds)
        assert 0.4 < encoder_share < 0.6
    assert len({tuple(sorted(tasks.items())) for tasks in rounds[:10]}) > 1
    # Pairs are redrawn: any two nodes sometimes report the same end (so they were not paired).
    for a in nodes:
        for b in nodes[a + 1:]:
            assert any((ENC in tasks[a]) == (ENC in tasks[b]) for tasks in rounds), (a, b)


def test_usplit_odd_client_is_redrawn_every_round() -> None:
    rng = random.Random(2)
    rounds = [usplit_assignment([0, 1, 2], rng) for _ in range(200)]
    for node in (0, 1, 2):
        # Only a pair member can go without the bottleneck: every node is sometimes in the pair.
        assert any(BOT not in tasks[node] for tasks in rounds), node


def test_usplit_bottleneck_goes_to_either_member_of_a_pair() -> None:
    rng = random.Random(1)
    with_encoder = 0
    trials = 1000
    for _ in range(trials):
        tasks = usplit_assignment([1, 2], rng)
        assert set(tasks.values()) in ({(ENC, BOT), (DEC,)}, {(ENC,), (BOT, DEC)})
        with_encoder += (ENC, BOT) in tasks.values()
    assert 0.4 < with_encoder / trials < 0.6


@pytest.mark.parametrize("k", [3, 5, 7])
def test_usplit_odd_client_reports_the_encoder_or_the_decoder(k: int) -> None:
    rng = random.Random(k)
    extra: Counter[str] = Counter()
    trials = 600
    for _ in range(trials):
        count = reporters(usplit_assignment(list(range(k)), rng))
        extra[ENC if count[ENC] > count[DEC] else DEC] += 1
    assert 0.4 < extra[ENC] / trials < 0.6
    assert extra[ENC] + extra[DEC] == trials


# -- communication count --------------------------------------------------------------------
@pytest.fixture(scope="module")
def sizes() -> dict[str, int]:
    return part_sizes(UNet(28, (1, 2, 4), 1))


def reduction(method: str, sizes: dict[str, int], clients: int = 10, rounds: int = 15) -> float:
    return 1 - cumulative_cost(method, sizes, clients, rounds)[-1] / cumulative_cost("full", sizes, clients, rounds)[-1]


def test_paper_communication_reductions(sizes: dict[str, int]) -> None:
    assert 73.0 < 100 * reduction("udec", sizes) < 74.0
    assert 40.5 < 100 * reduction("ulatdec", sizes) < 41.8
    assert reduction("usplit", sizes) == pytest.approx(0.25, abs=1e-12)
    assert reduction("full", sizes) == 0.0


def test_full_moves_the_whole_model_both_ways_every_round(sizes: dict[str, int]) -> None:
    whole = sum(sizes.values())
    assert cumulative_cost("full", sizes, 10, 15) == [2 * 10 * whole * r for r in range(1, 16)]


@pytest.mark.parametrize("method", ["ulatdec", "udec"])
def test_personalized_methods_send_the_whole_model_down_only_at_first(method: str, sizes: dict[str, int]) -> None:
    whole = sum(sizes.values())
    shared = sum(sizes[p] for p in SHARED_PARTS[method])
    first = round_cost(method, sizes, 10, first_round=True)
    later = round_cost(method, sizes, 10, first_round=False)
    assert (first.down, first.up) == (10 * whole, 10 * shared)
    assert (later.down, later.up) == (10 * shared, 10 * shared)
    totals = cumulative_cost(method, sizes, 10, 15)
    assert len(totals) == 15
    assert totals[0] == first.down + first.up
    assert all(b - a == later.down + later.up for a, b in zip(totals, totals[1:]))


def test_usplit_costs(sizes: dict[str, int]) -> None:
    whole = sum(sizes.values())
    e, b, d = (sizes[p] for p in ALL_PARTS)
    lone = round_cost("usplit", sizes, 1, first_round=False)
    assert (lone.down, lone.up) == (whole, whole)
    for k in (2, 4, 10):
        cost = round_cost("usplit", sizes, k, first_round=False)
        assert (cost.down, cost.up) == (k * whole, k // 2 * whole)
    for k in (3, 5, 11):
        for first in (True, False):
            cost = round_cost("usplit", sizes, k, first_round=first)
            assert cost.down == k * whole
            assert cost.up == pytest.approx(k // 2 * whole + b + (e + d) / 2, rel=1e-12)


@pytest.mark.parametrize("k", [4, 5])
def test_usplit_upload_matches_the_drawn_tasks(k: int, sizes: dict[str, int]) -> None:
    rng = random.Random(3)
    trials = 2000
    uploads = [sum(sizes[p] for parts in usplit_assignment(list(range(k)), rng).values() for p in parts)
               for _ in range(trials)]
    expected = round_cost("usplit", sizes, k, first_round=False).up
    if k % 2 == 0:
        assert set(uploads) == {expected}
    else:
        assert sum(uploads) / trials == pytest.approx(expected, rel=0.02)


def test_cumulative_cost_edges_and_unknown_method(sizes: dict[str, int]) -> None:
    assert cumulative_cost("udec", sizes, 5, 0) == []
    with pytest.raises(ValueError, match="unknown method"):
        round_cost("fedprox", sizes, 5, first_round=True)
    with pytest.raises(ValueError, match="unknown method"):
        cumulative_cost("FULL", sizes, 5, 3)
