"""The round loop: Flower's ``Strategy.start`` loop, able to start at any round and never to wait forever.

``Strategy.start`` always counts from round 1 and, through ``sample_nodes``, waits without
a limit for nodes. A resumed run must continue at the round after its checkpoint, and a
deployment whose SuperNodes never come must end with a reason, so the server drives the
strategy's own hooks here, in the order ``start`` calls them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedapp.log import log

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]
MetricsFn = Callable[[int, str, MetricRecord | None], None]  # (round, "train" | "evaluate", aggregated)


class NodesMissingError(RuntimeError):
    """Too few SuperNodes connected within ``strategy.node-timeout``."""


def wait_for_nodes(grid: Grid, needed: int, timeout: float, server_round: int, poll: float = 1.0) -> int:
    """How many nodes are connected, once at least ``needed`` are; NodesMissingError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    logged = -1
    while (connected := len(list(grid.get_node_ids()))) < needed:
        if time.monotonic() >= deadline:
            raise NodesMissingError(
                f"round {server_round}: {connected} of the {needed} SuperNodes strategy.min-nodes asks for "
                f"connected within strategy.node-timeout = {timeout:g} s; start more SuperNodes or lower "
                "strategy.min-nodes")
        if connected != logged:
            log(INFO, "round %d waits for SuperNodes: %d of %d connected", server_round, connected, needed)
            logged = connected
        time.sleep(min(poll, max(deadline - time.monotonic(), 0.0)))
    return connected


def run_rounds(strategy: FedAvg, grid: Grid, arrays: ArrayRecord, *, first: int, last: int, timeout: float,
               min_nodes: int, node_timeout: float, evaluate_fn: EvaluateFn,
               config: ConfigRecord | None = None, metrics_fn: MetricsFn | None = None) -> ArrayRecord:
    """Rounds ``first``..``last`` of ``strategy`` from the global ``arrays``; the final global arrays.

    ``evaluate_fn(0, arrays)`` runs only for a fresh run (``first == 1``), as in ``start``.
    ``config`` goes to every train and evaluate message (the strategy adds ``server-round``).
    ``metrics_fn`` receives what the strategy aggregated from the replies it kept, before ``evaluate_fn``.
    """
    take = metrics_fn or (lambda *_: None)
    if first == 1:
        evaluate_fn(0, arrays)
    for server_round in range(first, last + 1):
        log(INFO, "")
        log(INFO, "[ROUND %s/%s]", server_round, last)
        wait_for_nodes(grid, min_nodes, node_timeout, server_round)
        replies = grid.send_and_receive(
            messages=strategy.configure_train(server_round, arrays, ConfigRecord(dict(config or {})), grid),
            timeout=timeout)
        new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        take(server_round, "train", train_metrics)
        if train_metrics is not None:
            log(INFO, "\t└──> Aggregated MetricRecord: %s", train_metrics)
        replies = grid.send_and_receive(
            messages=strategy.configure_evaluate(server_round, arrays, ConfigRecord(dict(config or {})), grid),
            timeout=timeout)
        evaluate_metrics = strategy.aggregate_evaluate(server_round, replies)
        take(server_round, "evaluate", evaluate_metrics)
        if evaluate_metrics is not None:
            log(INFO, "\t└──> Aggregated MetricRecord: %s", evaluate_metrics)
        evaluate_fn(server_round, arrays)
    return arrays
