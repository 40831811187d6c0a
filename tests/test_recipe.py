"""The training recipe, part by part: warm-up, the lr decay, clipping, optimizer state, Min-SNR-γ, the EMAs.

Each part is checked on and off against values computed by hand here; the resume tests
(tests/test_resume.py) carry the optimizer state and the EMAs through a killed run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fedapp.config import ConfigError, TrainConfig, parse_config
from fedapp.model.diffusion import Diffusion
from fedapp.model.unet import build_unet
from fedapp.runs.node_state import OPTIMIZER, load_node_model, load_node_round, sampling_weights
from fedapp.train.ema import ema_state, ema_weights, load_ema, make_ema
from fedapp.train.loop import shuffled_batches, train_local
from fedapp.train.optim import Recipe, Stepper
from fedapp.train.round_ema import RoundEMA
from tests.support.inprocess import run_inprocess

CPU = torch.device("cpu")


def _linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(3, 2)


def _loss(model: nn.Module, scale: float = 1.0) -> torch.Tensor:
    x = torch.arange(6, dtype=torch.float32).view(2, 3)
    return scale * model(x).pow(2).sum()


# ------------------------------------------------------------------------------ warm-up
def test_warmup_rises_linearly_then_stays_and_off_is_flat() -> None:
    recipe = Recipe(lr=1e-3, warmup_steps=4)
    assert [recipe.lr_at(s) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert [Recipe(lr=1e-3).lr_at(s) for s in range(3)] == [1e-3] * 3


def test_the_stepper_takes_each_step_at_the_warmup_lr() -> None:
    model = _linear()
    stepper = Stepper(dict(model.named_parameters()), Recipe(lr=0.1, warmup_steps=2))
    seen = []
    for _ in range(3):
        stepper.step(_loss(model))
        seen.append(stepper.optimizer.param_groups[0]["lr"])
    assert seen == pytest.approx([0.05, 0.1, 0.1]) and stepper.steps == 3


# ------------------------------------------------------------------------------ lr decay
def test_the_decay_follows_the_run_round_by_round_and_off_is_flat() -> None:
    cfg = TrainConfig(rounds=4, lr=1e-3, warmup_steps=0, final_lr_ratio=0.1)
    # round 2 of 4 covers the run's progress 0.25..0.5: the cosine 1 -> 0.1 at 0.25 and 0.375
    second = Recipe.from_config(cfg, 2)
    assert second.span == (0.25, 0.5)
    assert second.lr_at(0, 0.0) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + 0.7071067811865476)))
    assert second.lr_at(0, 0.5) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + 0.38268343236508984)))
    assert Recipe.from_config(cfg, 1).lr_at(0, 0.0) == pytest.approx(1e-3)
    assert Recipe.from_config(cfg, 4).lr_at(0, 1.0) == pytest.approx(1e-4)  # the run's last step
    flat = Recipe.from_config(cfg.model_copy(update={"final_lr_ratio": 1.0}), 3)
    assert [flat.lr_at(s, d) for s, d in ((0, 0.0), (5, 0.5), (9, 0.99))] == pytest.approx([1e-3] * 3)
    with pytest.raises(ValueError, match="server round 5 is outside 1..4"):
        Recipe.from_config(cfg, 5)


def test_warmup_scales_the_decayed_lr() -> None:
    recipe = Recipe(lr=1.0, warmup_steps=2, final_lr_ratio=0.5, span=(0.5, 1.0))
    assert recipe.lr_at(0, 0.0) == pytest.approx(0.75 * 0.5)  # half-way down the cosine, half warmed up
    assert recipe.lr_at(2, 1.0) == pytest.approx(0.5)


def test_batches_carry_the_share_done_and_stop_at_the_cap() -> None:
    gen = torch.Generator().manual_seed(0)
    dealt = list(shuffled_batches(10, 4, 2, gen, CPU))  # 3 batches a pass
    assert [len(pick) for pick, _ in dealt] == [4, 4, 2, 4, 4, 2]
    assert [done for _, done in dealt] == pytest.approx([0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6])
    capped = list(shuffled_batches(10, 4, 2, torch.Generator().manual_seed(0), CPU, max_batches=4))
    assert [done for _, done in capped] == pytest.approx([0, 0.25, 0.5, 0.75])
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(capped, dealt[:4], strict=False))


# ------------------------------------------------------------------------------ clipping
@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_gradients_are_clipped_to_the_norm_and_not_without_it(clip: float) -> None:
    model, twin = _linear(), _linear()
    _loss(twin, 100.0).backward()
    raw = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in twin.parameters()]))
    assert raw > 10  # a large step to clip
    stepper = Stepper(dict(model.named_parameters()), Recipe(lr=1e-3, grad_clip=clip))
    stepper.step(_loss(model, 100.0))
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert float(norm) == pytest.approx(clip if clip else float(raw), rel=1e-5)


# ------------------------------------------------------------------------------ optimizer state
def test_a_saved_stepper_continues_exactly_where_it_stood() -> None:
    whole, cut = _linear(), _linear()
    recipe = Recipe(lr=0.01, warmup_steps=3, grad_clip=1.0)
    one = Stepper(dict(whole.named_parameters()), recipe)
    for _ in range(5):
        one.step(_loss(whole))
    first = Stepper(dict(cut.named_parameters()), recipe)
    for _ in range(2):
        first.step(_loss(cut))
    saved = first.state_dict()
    assert saved["steps"] == 2 and set(saved["moments"]) == {"weight", "bias"}
    second = Stepper(dict(cut.named_parameters()), recipe, saved)  # a new process, the same weights
    for _ in range(3):
        second.step(_loss(cut))
    assert second.steps == 5
    for a, b in zip(whole.parameters(), cut.parameters(), strict=True):
        assert torch.equal(a, b)
    fresh = _linear()
    restarted = Stepper(dict(fresh.named_parameters()), recipe)  # "fresh": Adam and warm-up start over
    assert restarted.steps == 0 and not restarted.optimizer.state


def test_moments_of_parameters_not_trained_now_are_carried_and_new_ones_start_fresh() -> None:
    model = _linear()
    params = dict(model.named_parameters())
    first = Stepper({"weight": params["weight"]}, Recipe(lr=0.01))
    first.step(_loss(model))
    kept = first.state_dict()["moments"]["weight"]["exp_avg"].clone()
    second = Stepper({"bias": params["bias"]}, Recipe(lr=0.01), first.state_dict())
    assert not second.optimizer.state  # the bias has no moments yet
    second.step(_loss(model))
    state = second.state_dict()
    assert set(state["moments"]) == {"weight", "bias"} and state["steps"] == 2
    assert torch.equal(state["moments"]["weight"]["exp_avg"], kept)


def test_a_state_for_other_shapes_is_one_clear_error() -> None:
    model = _linear()
    saved = Stepper(dict(model.named_parameters()), Recipe(lr=0.01))
    saved.step(_loss(model))
    other = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="does not fit this model: weight: saved"):
        Stepper(dict(other.named_parameters()), Recipe(lr=0.01), saved.state_dict())


def test_train_local_hands_back_its_state_and_continues_from_it() -> None:
    torch.manual_seed(0)
    model = build_unet(8, (1, 2), 1, 8)
    images = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8)
    recipe = Recipe(lr=1e-3, warmup_steps=10)
    first = train_local(model, Diffusion(), images, epochs=1, batch_size=8, recipe=recipe, seed=0, device=CPU)
    assert first.optimizer is not None and first.optimizer["steps"] == 4
    second = train_local(model, Diffusion(), images, epochs=1, batch_size=8, recipe=recipe, seed=1, device=CPU,
                         optimizer=first.optimizer)
    assert second.optimizer is not None and second.optimizer["steps"] == 8  # the warm-up went on
    step = next(iter(second.optimizer["moments"].values()))["step"]
    assert int(step) == 8


# ------------------------------------------------------------------------------ Min-SNR-γ
def test_min_snr_weights_are_min_snr_gamma_over_snr() -> None:
    diffusion = Diffusion(1000, min_snr_gamma=5.0)
    t = torch.tensor([0, 100, 500, 999])
    abar = diffusion.scheduler.alphas_cumprod[t].double()
    snr = abar / (1 - abar)
    expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr
    assert torch.allclose(diffusion.snr_weights(t).double(), expected, rtol=1e-5)
    assert float(diffusion.snr_weights(torch.tensor([999]))) == pytest.approx(1.0)  # SNR < γ: unweighted
    assert float(diffusion.snr_weights(torch.tensor([0]))) < 1e-3  # nearly clean: almost no weight


class _Constant(nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.value.expand_as(x)


@pytest.mark.parametrize("loss", ["mse", "huber"])
def test_the_weighted_loss_is_the_weighted_mean_of_per_image_losses(loss: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x_t, target = torch.randn(4, 1, 4, 4, generator=gen), torch.randn(4, 1, 4, 4, generator=gen)
    t = torch.tensor([3, 50, 400, 900])
    model = _Constant(torch.full((1, 1, 4, 4), 0.7))
    plain = Diffusion(1000, loss=loss)  # type: ignore[arg-type]
    weighted = Diffusion(1000, loss=loss, min_snr_gamma=5.0)  # type: ignore[arg-type]
    diff = (0.7 - target).flatten(1)
    per_image = (diff.pow(2) if loss == "mse" else torch.where(diff.abs() < 1, 0.5 * diff.pow(2), diff.abs() - 0.5))
    per_image = per_image.mean(1)
    assert float(plain.loss_on(model, x_t, t, target)) == pytest.approx(float(per_image.mean()), rel=1e-5)
    want = float((per_image * weighted.snr_weights(t)).mean())
    assert float(weighted.loss_on(model, x_t, t, target)) == pytest.approx(want, rel=1e-5)
    # held-out losses drop the weights, so runs with and without Min-SNR compare
    assert float(weighted.loss_on(model, x_t, t, target, weighted=False)) == pytest.approx(float(per_image.mean()))


# ------------------------------------------------------------------------------ EMA
def _ema_cfg(decay: float = 0.9, power: float = 1.0) -> TrainConfig:
    return TrainConfig(ema_decay=decay, ema_power=power)


def test_no_ema_when_the_decay_is_zero() -> None:
    assert make_ema(_linear(), _ema_cfg(decay=0.0)) is None


def test_the_step_ema_follows_the_warmed_up_decay() -> None:
    model = _linear()
    ema = make_ema(model, _ema_cfg(decay=0.9, power=1.0))
    assert ema is not None
    expected = model.weight.detach().clone()
    for step in range(1, 5):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.step(model.parameters())
        k = step - 1  # EMAModel's warm-up: 0 on the first step, then 1 - (1 + k) ** -power, capped
        decay = min(1 - (1 + k) ** -1.0, 0.9) if k else 0.0
        expected = decay * expected + (1 - decay) * model.weight.detach()
    assert torch.allclose(ema_weights(ema, model)["weight"], expected, atol=1e-6)


def test_a_saved_ema_restores_its_weights_and_its_count() -> None:
    model = _linear()
    ema = make_ema(model, _ema_cfg())
    assert ema is not None
    for _ in range(3):
        with torch.no_grad():
            model.weight.mul_(1.5)
        ema.step(model.parameters())
    state = ema_state(ema, model)
    again = make_ema(model, _ema_cfg(), state)
    assert again is not None and again.optimization_step == 3
    assert all(torch.equal(a, b) for a, b in zip(again.shadow_params, ema.shadow_params, strict=True))
    with pytest.raises(ValueError, match="lacks 1 of the model's parameters"):
        load_ema(again, model, {"weights": {"weight": model.weight}, "steps": 1})


def test_the_round_ema_counts_a_round_as_its_local_steps() -> None:
    model = _linear()
    start = model.weight.detach().clone()
    ema = RoundEMA(model, _ema_cfg(decay=0.99, power=1.0))
    after = []
    for _ in range(2):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model, local_steps=10)
        after.append(model.weight.detach().clone())
    assert ema.optimization_step == 20
    d1 = min(1 - (1 + 9) ** -1.0, 0.99) ** 10  # the steps 1..10 end at count 10
    d2 = min(1 - (1 + 19) ** -1.0, 0.99) ** 10
    first = d1 * start + (1 - d1) * after[0]
    want = d2 * first + (1 - d2) * after[1]
    assert torch.allclose(ema_weights(ema, model)["weight"], want, atol=1e-6)


# ------------------------------------------------------------------------------ config
@pytest.mark.parametrize(("key", "value"), [("train.ema-decay", 1.0), ("train.grad-clip", -1.0),
                                            ("train.warmup-steps", -1), ("diffusion.min-snr-gamma", -5.0),
                                            ("train.optimizer-state", "keep")])
def test_bad_recipe_values_are_refused_naming_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key):
        parse_config({key: value})


# ------------------------------------------------------------------------------ on the nodes
RECIPE_OFF = {"train.optimizer-state": "fresh", "train.ema-decay": 0.0}


@pytest.mark.usefixtures("task_identity")  # Messages are built outside a Flower run
@pytest.mark.parametrize("method", ["full", "udec"])
def test_clients_keep_adam_on_their_disk_only_when_it_persists(tmp_path: Path, method: str) -> None:
    on, _, _ = run_inprocess(tmp_path / "on", nodes=2, **{"strategy.name": method, "train.rounds": 2})
    off, _, _ = run_inprocess(tmp_path / "off", nodes=2, **{"strategy.name": method, "train.rounds": 2, **RECIPE_OFF})
    for node in on.node_ids:
        saved = load_node_round(on.state_dir(node), OPTIMIZER)
        assert saved is not None and saved["round"] == 2
        assert saved["optimizer"]["steps"] == 2 * on.cfg.train.max_steps_per_round  # type: ignore[index]
        assert load_node_round(off.state_dir(node), OPTIMIZER) is None


@pytest.mark.usefixtures("task_identity")
def test_a_personal_model_keeps_its_ema_on_its_disk_and_samples_with_it(tmp_path: Path) -> None:
    run, _, _ = run_inprocess(tmp_path, nodes=2, **{"strategy.name": "udec", "train.rounds": 2})
    for node in run.node_ids:
        saved = load_node_model(run.state_dir(node))
        assert saved is not None and isinstance(saved.get("ema"), dict)
        assert saved["ema"]["steps"] == 2 * run.cfg.train.max_steps_per_round  # type: ignore[index]
        weights = sampling_weights(saved)
        assert any(not torch.equal(weights[k], saved["model"][k]) for k in weights)  # type: ignore[index]
    off, _, _ = run_inprocess(tmp_path / "off", nodes=2, **{"strategy.name": "udec", "train.rounds": 2, **RECIPE_OFF})
    saved = load_node_model(off.state_dir(off.node_ids[0]))
    assert saved is not None and "ema" not in saved and sampling_weights(saved) is saved["model"]
