"""conf/gpu-study.toml (scripts/gpu_study.sh): the paper's model, clients, rounds and data, sized to fit."""

from __future__ import annotations

import math
import tomllib

from fedapp.config import FedConfig, parse_config
from fedapp.deploy.simulation import REPO


def _load(name: str) -> FedConfig:
    return parse_config(tomllib.loads((REPO / "conf" / name).read_text()))


def test_the_gpu_study_keeps_the_papers_model_clients_rounds_and_data() -> None:
    study, paper = _load("gpu-study.toml"), _load("paper-fmnist.toml")
    assert study.model == paper.model
    assert (study.data.num_partitions, study.train.rounds, study.train.batch_size) == (5, 15, 128)
    assert (study.data.max_train_examples, study.data.partitioner) == (0, "iid")
    assert study.data.val_fraction == paper.data.val_fraction
    assert study.train.device == "cuda"


def test_the_gpu_study_is_capped_scored_once_and_on_the_recipe() -> None:
    study = _load("gpu-study.toml")
    per_client = 60_000 * (1 - study.data.val_fraction) / study.data.num_partitions
    assert 0 < study.train.max_steps_per_round < math.ceil(per_client / study.train.batch_size)  # the cap binds
    assert study.eval.every == study.train.rounds and study.eval.fid == "auto"
    assert (study.eval.sampler, study.eval.sampler_steps, study.eval.metric_samples) == ("ddpm", 50, 1000)
    assert study.train.optimizer_state == "persist" and study.train.warmup_steps > 0
    assert study.train.ema_decay > 0 and study.diffusion.min_snr_gamma > 0
