"""One source of defaults: pyproject.toml's run config is generated from the pydantic models."""

from __future__ import annotations

import tomllib

from fedapp.config import FedConfig, defaults_table, parse_config
from fedapp.deploy.simulation import REPO


def test_pyproject_run_config_is_the_models_defaults() -> None:
    text = (REPO / "pyproject.toml").read_text()
    table = text[text.index("[tool.flwr.app.config]"):]
    assert table == defaults_table(), "pyproject.toml disagrees with fedapp/config.py: python scripts/write_defaults.py"
    flat = tomllib.loads(text)["tool"]["flwr"]["app"]["config"]
    assert parse_config(flat) == FedConfig()


def test_the_paper_config_sets_every_key_where_the_paper_differs() -> None:
    paper = parse_config(tomllib.loads((REPO / "conf" / "paper-fmnist.toml").read_text()))
    assert (paper.model.dim, paper.train.rounds, paper.train.local_epochs, paper.train.batch_size) == (28, 15, 5, 128)
    assert paper.data.max_train_examples == 0 and paper.diffusion.clip_sample is False
    assert paper.eval.metric_samples == 1000 and paper.eval.sampler_steps == 1000
    assert paper.train.lr == 1e-4 and paper.diffusion.loss == "huber"
    # the authors' recipe: a fresh Adam per round, nothing of the CPU recipe
    assert (paper.train.optimizer_state, paper.train.warmup_steps, paper.train.grad_clip) == ("fresh", 0, 0.0)
    assert paper.train.ema_decay == 0.0 and paper.diffusion.min_snr_gamma == 0.0 and paper.train.final_lr_ratio == 1.0
