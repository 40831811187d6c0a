"""ServerApp: validate the config once, build the model (or resume a run), drive the chosen strategy."""

from __future__ import annotations

import time
from logging import ERROR, INFO

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedapp.config import ConfigError, FedConfig, parse_config
from fedapp.log import log
from fedapp.model.build import build_diffusion, build_model
from fedapp.protocol.comm import CommLedger, format_summary
from fedapp.protocol.keys import STATE_RUN
from fedapp.protocol.methods import clients_own_models
from fedapp.protocol.records import model_to_record
from fedapp.runs.checkpoint import save_checkpoint
from fedapp.runs.resume import ResumePoint, load_resume_point, rng_state, set_rng_state
from fedapp.runs.rundir import RUN_DIR_LINE, RunDir
from server_app.centralized import run_centralized
from server_app.recorder import RoundRecorder
from server_app.rounds import NodesMissingError, run_rounds
from server_app.transport import DeltaGrid, server_grid
from strategies import CollaFuse, build_strategy

app = ServerApp()


def _fail(err: Exception) -> SystemExit:
    """One line in the log and as the exit reason; nothing written so far is touched."""
    log(ERROR, "%s", err)
    return SystemExit(f"fedapp: {err}")


def _start(context: Context) -> tuple[FedConfig, RunDir, ResumePoint | None]:
    try:
        cfg = parse_config(context.run_config)
        point = load_resume_point(cfg) if cfg.output.resume else None
    except ConfigError as err:
        raise _fail(err) from None
    run = point.run if point else RunDir.create(cfg)
    if point:
        run.write_config(cfg.model_copy(update={"output": cfg.output.model_copy(update={"resume": ""})}))
        log(INFO, "resuming %s after round %d (%s)", run.path, point.round, point.checkpoint.name)
    return cfg, run, point


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, run, point = _start(context)
    log(INFO, "%s%s", RUN_DIR_LINE, run.path)

    if cfg.strategy.name == "centralized":
        num = cfg.data.num_partitions or len(grid.get_node_ids())
        rows = run_centralized(cfg, run, max(num, 1), point)
        log(INFO, "centralized baseline finished: %d rounds in %s", len(rows), run.path)
        return
    model = build_model(cfg, seed=cfg.seed)
    ledger = CommLedger.from_rows(point.extra["comm"]) if point else CommLedger()
    strategy_grid, metered = server_grid(grid, ledger, cfg, model)
    chain = strategy_grid.chain if isinstance(strategy_grid, DeltaGrid) else None
    strategy = build_strategy(cfg)
    state_run = point.state_run if point else context.run_id  # the nodes' state stays under the first run

    def server_state() -> dict[str, object]:
        transport = {"transport": chain.state()} if chain is not None else {}
        return {"strategy": strategy.state(), "rng": rng_state(), STATE_RUN: state_run, **transport}

    recorder = RoundRecorder(cfg, run, model, build_diffusion(cfg), metered, ledger, run_id=state_run,
                             split=strategy if isinstance(strategy, CollaFuse) else None, server_state=server_state)
    if point:
        model.load_state_dict(point.model)
        strategy.restore(point.extra["strategy"])
        if chain is not None and "transport" in point.extra:
            chain.restore(point.extra["transport"])
        set_rng_state(point.extra["rng"])
        recorder.restore(point.extra["metrics"])
        recorder.restore_ema(point.ema)
    started = time.perf_counter()
    try:
        run_rounds(strategy, strategy_grid, model_to_record(model), first=point.round + 1 if point else 1,
                   last=cfg.train.rounds, timeout=cfg.strategy.round_timeout, min_nodes=cfg.strategy.min_nodes,
                   node_timeout=cfg.strategy.node_timeout, evaluate_fn=recorder, metrics_fn=recorder.take_metrics,
                   config=ConfigRecord({STATE_RUN: state_run}))
    except NodesMissingError as err:
        raise _fail(err) from None
    clients = recorder.client_models()
    final = save_checkpoint(
        run.path / "final.pt", cfg, cfg.train.rounds, recorder.model,
        extra={"comm": ledger.rows(), "metrics": recorder.rows, "clients": clients, **server_state()},
        ema=recorder.ema_state(),
    )
    if clients_own_models(cfg.strategy.name):
        log(INFO, "final checkpoint holds %d client models (fedapp sample %s --client ID)", len(clients), final)
    log(INFO, "communication (all rounds):\n%s", format_summary(ledger))
    log(INFO, "fedapp finished in %.1f s; final checkpoint %s", time.perf_counter() - started, final)
