"""Call the real ClientApp ``train`` handler in-process, as a SuperNode would, without Flower's runtime.

Benchmarks use it to time what one training message costs a ClientApp: config parsing,
its data share, building the model, loading the arrays, training and the reply record.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client_app.app import train as client_train
from fedapp.config import FedConfig, parse_config
from fedapp.model.build import build_model
from fedapp.protocol.records import model_to_record

RUN_ID = 77


def bench_config(dim: int, batch: int, steps: int, device: str, **extra: Any) -> FedConfig:
    """One training message of ``steps`` optimizer steps on the real Fashion-MNIST."""
    return parse_config({
        "model.dim": dim, "model.dim-mults": "1,2,4", "train.batch-size": batch,
        "train.max-steps-per-round": steps, "train.local-epochs": 1000, "train.device": device,
        "data.max-train-examples": 0, "output.progress": False, "eval.fid": "off", **extra,
    })


class ClientAppCaller:
    """Builds the messages a server would send and hands them to the handler."""

    def __init__(self, cfg: FedConfig, partition_id: int = 0, num_partitions: int = 1) -> None:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = RUN_ID, 1, 1  # type: ignore[attr-defined]
        self.cfg = cfg
        self.context = Context(run_id=RUN_ID, node_id=1 + partition_id, state=RecordDict(), run_config=cfg.flat(),
                               node_config={"partition-id": partition_id, "num-partitions": num_partitions})
        self.arrays: ArrayRecord = model_to_record(build_model(cfg, seed=cfg.seed), dtype=cfg.transport.dtype)
        self.round = 0

    def train(self) -> Message:
        """One round's training message, answered; the reply's arrays become the next round's."""
        self.round += 1
        content = RecordDict({"arrays": self.arrays, "config": ConfigRecord({"server-round": self.round})})
        msg = Message(content=content, dst_node_id=self.context.node_id, message_type=MessageType.TRAIN)
        reply = client_train(msg, self.context)
        self.arrays = reply.content["arrays"]
        return reply
