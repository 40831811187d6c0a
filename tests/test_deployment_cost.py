"""bench/deployment_cost.py splits a message's wall time by the timestamped lines of every process.

The lines below are the shapes Flower 1.42 and fedapp's logger write at FLWR_LOG_LEVEL=DEBUG (copied from
a run, trimmed): the ServerApp's (through `flwr run --stream`, coloured) and one SuperNode's with its ClientApp.
"""

from __future__ import annotations

import pytest

from bench.deployment_cost import SEGMENTS, breakdown, node_messages, server_events, summarize

SERVER = """\
INFO    2026-12-06 12:19:13,242 fedapp: [ROUND 1/1]
\x1b[92mINFO 2026-12-06 12:19:13,250\x1b[0m:      configure_train: Sampled 1 nodes (out of 1)
\x1b[92mINFO 2026-12-06 12:19:44,250\x1b[0m:      aggregate_train: Received 1 results and 0 failures
\x1b[92mINFO 2026-12-06 12:19:44,500\x1b[0m:      configure_evaluate: Sampled 1 nodes (out of 1)
\x1b[92mINFO 2026-12-06 12:19:58,500\x1b[0m:      aggregate_evaluate: Received 1 results and 0 failures
"""

NODE = """\
INFO 2026-12-06 12:19:15,250:      Receiving: train message (ID: 819e)
DEBUG 2026-12-06 12:19:15,300:     Runtime.AcquireTask
INFO 2026-12-06 12:19:18,250:      Start `flwr-clientapp` process
DEBUG 2026-12-06 12:19:19,250:     [flwr-clientapp] Start FAB installation.
DEBUG 2026-12-06 12:19:19,500:     Loading ClientApp `client_app.app:app`
DEBUG   2026-12-06 12:19:22,500 fedapp: train message: start
INFO    2026-12-06 12:19:22,600 fedapp: partition from cache /root/.cache/x.pt
DEBUG   2026-12-06 12:19:22,750 fedapp: train message: data ready
DEBUG   2026-12-06 12:19:23,000 fedapp: train message: model ready
DEBUG   2026-12-06 12:19:33,000 fedapp: train message: computed
DEBUG   2026-12-06 12:19:33,500 fedapp: train message: reply ready
DEBUG 2026-12-06 12:19:33,750:     Runtime.PushMessages
INFO 2026-12-06 12:19:39,000:      Sent successfully
INFO 2026-12-06 12:19:46,500:      Receiving: evaluate message (ID: ffbc)
INFO 2026-12-06 12:19:48,500:      Start `flwr-clientapp` process
DEBUG 2026-12-06 12:19:49,500:     [flwr-clientapp] Start FAB installation.
DEBUG 2026-12-06 12:19:49,500:     Loading ClientApp `client_app.app:app`
DEBUG   2026-12-06 12:19:53,500 fedapp: evaluate message: start
DEBUG   2026-12-06 12:19:53,500 fedapp: evaluate message: data ready
DEBUG   2026-12-06 12:19:53,500 fedapp: evaluate message: model ready
DEBUG   2026-12-06 12:19:55,500 fedapp: evaluate message: computed
DEBUG   2026-12-06 12:19:55,500 fedapp: evaluate message: reply ready
DEBUG 2026-12-06 12:19:55,500:     Runtime.PushMessages
INFO 2026-12-06 12:19:57,500:      Sent successfully
"""


def test_a_message_is_split_into_consecutive_segments_that_add_up() -> None:
    rows = breakdown(server_events(SERVER), [node_messages(NODE)])
    train = next(row for row in rows if row["kind"] == "train")
    assert train["segments"] == pytest.approx({
        "server push + SuperNode poll": 2.0, "ClientApp start (SuperExec poll, Python, flwr)": 3.0,
        "message download into the ClientApp": 1.0, "FAB install": 0.25, "import client_app.app": 3.0,
        "data (config, partition cache)": 0.25, "model build + node state": 0.25, "compute": 10.0,
        "records of the reply": 0.5, "reply to the SuperNode": 0.25, "reply upload to the SuperLink": 5.25,
        "server reply poll + download": 5.25})
    assert train["total_s"] == pytest.approx(31.0) == pytest.approx(sum(train["segments"].values()))
    assert train["non_compute_s"] == pytest.approx(21.0)
    evaluate = summarize(rows, "evaluate")
    assert evaluate["total_s"] == pytest.approx(14.0) and evaluate["non_compute_s"] == pytest.approx(12.0)
    assert list(evaluate["segments"]) == [name for name, _, _ in SEGMENTS]


def test_a_log_without_the_clientapp_milestones_is_refused_by_name() -> None:
    bare = "\n".join(line for line in NODE.splitlines() if "fedapp:" not in line)
    with pytest.raises(SystemExit, match=r"node 0, train message of round 1: no milestone for .*compute"):
        breakdown(server_events(SERVER), [node_messages(bare)])
