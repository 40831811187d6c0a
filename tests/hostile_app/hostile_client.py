"""A hostile data owner: the real ClientApp, whose train reply on partition 0 is attacked each round.

Only for ``tests/test_hostile_node.py``, which copies this file beside a copy of the project's
pyproject.toml into an app folder of its own; nothing in the product imports it. Partition 0
trains honestly and then breaks its reply in a different way each round (``ATTACKS``);
every other node is the real, honest client.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from client_app.app import app as real
from fedapp.protocol.keys import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, SERVER_ROUND
from fedapp.protocol.packing import unpack_content

app = ClientApp()


def _nan_weight(arrays: ArrayRecord, metrics: MetricRecord) -> None:
    metrics[NUM_EXAMPLES] = math.nan


def _lying_bytes(arrays: ArrayRecord, metrics: MetricRecord) -> None:
    """Metadata says the bias's own shape; the bytes hold a (2, n) array."""
    key = next(k for k in sorted(arrays.keys()) if k.endswith("bias"))
    held = np.zeros((2, *arrays[key].shape), np.float32)
    arrays[key] = Array(arrays[key].dtype, tuple(arrays[key].shape), "numpy.ndarray", Array(held).data)


def _inf_weight(arrays: ArrayRecord, metrics: MetricRecord) -> None:
    metrics[NUM_EXAMPLES] = math.inf


def _nan_weights(arrays: ArrayRecord, metrics: MetricRecord) -> None:
    key = sorted(arrays.keys())[0]
    poisoned = arrays[key].numpy().copy()
    poisoned.flat[0] = np.nan
    arrays[key] = Array(poisoned)


ATTACKS = {1: ("NaN num-examples", _nan_weight), 2: ("bytes of another shape", _lying_bytes),
           3: ("Inf num-examples", _inf_weight), 4: ("NaN weights", _nan_weights)}


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = real(msg, context)
    unpack_content(reply.content)  # attack the arrays themselves; the server takes unpacked replies too
    server_round = int(msg.content[CONFIG][SERVER_ROUND])
    if int(context.node_config.get("partition-id", -1)) == 0 and server_round in ATTACKS:
        ATTACKS[server_round][1](reply.content[ARRAYS], reply.content[METRICS])
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return real(msg, context)
