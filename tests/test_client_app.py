"""The ClientApp's node bookkeeping (its handlers run for real in the e2e test)."""

from __future__ import annotations

import pytest

from client_app.app import node_partition


def test_partition_comes_from_the_node_config() -> None:
    assert node_partition({"partition-id": 1, "num-partitions": 5}, 0) == (1, 5)


def test_data_num_partitions_fills_in_a_missing_count() -> None:
    assert node_partition({"partition-id": 2}, 4) == (2, 4)


@pytest.mark.parametrize("node_config, configured, match", [
    ({}, 3, "partition-id"),
    ({"partition-id": 0}, 0, "num-partitions"),
    ({"partition-id": 0, "num-partitions": 5}, 4, "disagree|agree"),
])
def test_missing_or_conflicting_partition_settings_are_named(
    node_config: dict[str, int], configured: int, match: str
) -> None:
    with pytest.raises((KeyError, ValueError), match=match):
        node_partition(node_config, configured)
