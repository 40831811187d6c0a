"""A whole federated run in one process: real strategy, real ClientApp handlers, FakeGrid.

Every message in both directions is kept, so tests can inspect exactly what travelled.
Each handler call gets a fresh Context, as a deployment's fresh ClientApp process would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, Message, RecordDict

from client_app.app import app as client_app
from fedapp.config import FedConfig, parse_config
from fedapp.model.build import build_model
from fedapp.protocol.comm import CommLedger
from fedapp.protocol.packing import is_packed, unpack_record
from fedapp.protocol.records import model_to_record
from fedapp.runs.node_state import node_dir, state_root
from server_app.transport import server_grid
from strategies import build_strategy
from tests.support.mocks import FakeGrid

RUN_ID = 4242


def tiny_config(tmp_path: Path, **overrides: Any) -> FedConfig:
    base: dict[str, Any] = {
        "model.dim": 8, "model.dim-mults": "1,2", "data.max-train-examples": 120,
        "train.rounds": 3, "train.batch-size": 16, "train.max-steps-per-round": 2, "train.lr": 1e-3,
        "eval.max-val-examples": 8, "eval.metric-samples": 0, "eval.fid": "off", "output.progress": False,
        "train.node-state-dir": str(tmp_path / "nodes"), "output.dir": str(tmp_path / "runs"),
        "train.ema-decay": 0.995,  # off by default; the tests follow it where it lives, through resumes
    }
    return parse_config({**base, **overrides})


@dataclass
class InProcessRun:
    cfg: FedConfig
    node_ids: list[int]
    sent: list[Message] = field(default_factory=list)
    replies: list[Message] = field(default_factory=list)
    ledger: CommLedger = field(default_factory=CommLedger)
    # The array dtypes of each message as it travelled (the server widens replies in place).
    dtypes: list[set[str]] = field(default_factory=list)
    run_id: int = RUN_ID  # what each ClientApp's Context says (a resumed run gets a new one)

    def state_dir(self, node: int, run_id: int | None = None) -> Path:
        """Where this node keeps its own model (by partition, under its run or the one named)."""
        return node_dir(state_root(self.cfg.train.node_state_dir), run_id or self.run_id, self.node_ids.index(node))

    def respond(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        context = Context(
            run_id=self.run_id, node_id=node, state=RecordDict(), run_config=self.cfg.flat(),
            node_config={"partition-id": self.node_ids.index(node), "num-partitions": len(self.node_ids)},
        )
        self.sent.append(msg)
        reply = client_app(msg, context)  # routed by message type, named actions included
        self.replies.append(reply)
        for message in (msg, reply):  # the ClientApp's mod unpacked msg in place; the reply is still packed
            records = [unpack_record(r) if is_packed(r) else r for r in message.content.array_records.values()]
            self.dtypes.append({a.dtype for r in records for a in r.values()})
        return reply

    def start(self, initial: ArrayRecord | None = None) -> tuple[ArrayRecord, ArrayRecord]:
        """(initial global arrays, final global arrays); the seeded initialization by default."""
        initial = initial or model_to_record(build_model(self.cfg, seed=self.cfg.seed))
        grid, _ = server_grid(FakeGrid(self.node_ids, self.respond), self.ledger, self.cfg,
                              build_model(self.cfg, seed=self.cfg.seed))
        self.grid = grid
        self.strategy = build_strategy(self.cfg)
        result = self.strategy.start(grid=grid, initial_arrays=initial, num_rounds=self.cfg.train.rounds)
        self.result = result
        return initial, result.arrays


def run_inprocess(tmp_path: Path, nodes: int = 3, **overrides: Any) -> tuple[InProcessRun, ArrayRecord, ArrayRecord]:
    run = InProcessRun(tiny_config(tmp_path, **overrides), node_ids=[101 + 7 * i for i in range(nodes)])
    initial, final = run.start()
    return run, initial, final
