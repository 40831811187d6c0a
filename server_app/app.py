"""ServerApp: validate the config once, build the model, run the chosen strategy."""

from __future__ import annotations

import time
from logging import ERROR, INFO

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedapp.builders import build_diffusion, build_model
from fedapp.centralized import run_centralized
from fedapp.checkpoint import save_checkpoint
from fedapp.comm import CommLedger, format_summary
from fedapp.config import ConfigError, parse_config
from fedapp.methods import clients_own_models
from fedapp.records import model_to_record
from fedapp.rundir import RunDir
from server_app.recorder import RoundRecorder
from server_app.transport import server_grid
from strategies import CollaFuse, build_strategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        cfg = parse_config(context.run_config)
    except ConfigError as err:
        log(ERROR, "%s", err)
        raise SystemExit(f"fedapp: {err}") from None
    run = RunDir.create(cfg)
    log(INFO, "fedapp run directory: %s", run.path)
    print(f"fedapp run directory: {run.path}", flush=True)

    if cfg.strategy.name == "centralized":
        num = cfg.data.num_partitions or len(grid.get_node_ids())
        rows = run_centralized(cfg, run, max(num, 1))
        log(INFO, "centralized baseline finished: %d rounds in %s", len(rows), run.path)
        return
    model = build_model(cfg, seed=cfg.seed)
    ledger = CommLedger()
    strategy_grid, metered = server_grid(grid, ledger, cfg.transport.dtype)
    strategy = build_strategy(cfg)
    split = strategy if isinstance(strategy, CollaFuse) else None
    recorder = RoundRecorder(cfg, run, model, build_diffusion(cfg), metered, ledger, run_id=context.run_id,
                             split=split)
    started = time.perf_counter()
    result = strategy.start(
        grid=strategy_grid,
        initial_arrays=model_to_record(model),
        num_rounds=cfg.train.rounds,
        timeout=cfg.strategy.round_timeout,
        evaluate_fn=recorder,
    )
    clients = recorder.client_models()
    final = save_checkpoint(
        run.path / "final.pt", cfg, cfg.train.rounds, recorder.model,
        extra={"comm": ledger.rows(), "metrics": recorder.rows, "clients": clients, **recorder.server_state()},
    )
    if clients_own_models(cfg.strategy.name):
        log(INFO, "final checkpoint holds %d client models (fedapp sample %s --client ID)", len(clients), final)
    log(INFO, "communication (all rounds):\n%s", format_summary(ledger))
    log(INFO, "fedapp finished in %.1f s; final checkpoint %s", time.perf_counter() - started, final)
    del result
