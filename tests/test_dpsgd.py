"""Sample-level DP-SGD (Opacus) in local training: per-image gradients on our UNet, clipping, noise,
Poisson batches and each client's own account, against values computed by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from flwr.app import MetricRecord, RecordDict

from client_app.node import sample_level_account
from fedapp.config import ConfigError, parse_config
from fedapp.model.build import build_model
from fedapp.privacy.accounting import PrivacyAccount
from fedapp.privacy.dpsgd import SampleLevelDP, batches_per_call
from fedapp.protocol.keys import DP_SGD_EPSILON
from fedapp.protocol.metrics import weighted_mean_over_clients
from fedapp.runs.node_state import DP_SGD_ACCOUNT, load_node_round
from fedapp.runs.rows import summary_line
from fedapp.train.loop import shuffled_batches
from fedapp.train.optim import Recipe, Stepper
from tests.support.inprocess import run_inprocess

TINY_UNET = {"model.dim": 8, "model.dim-mults": "1,2"}


def tiny_batch(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 1, 28, 28, generator=gen)
    t = torch.randint(0, 1000, (count,), generator=gen)
    return x, t, torch.randn(count, 1, 28, 28, generator=gen)


def one_at_a_time(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                  eps: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Each image's gradient of its own ε-MSE, by a backward pass over that image alone."""
    out = []
    for i in range(len(x)):
        model.zero_grad()
        F.mse_loss(model(x[i : i + 1], t[i : i + 1]), eps[i : i + 1]).backward()
        out.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    model.zero_grad()
    return out


# -- Opacus on our UNet -------------------------------------------------------------------
def test_opacus_gives_every_unet_layer_the_gradient_of_each_image_alone() -> None:
    model = build_model(parse_config(TINY_UNET))
    layers = {type(m).__name__ for m in model.modules() if any(True for _ in m.parameters(recurse=False))}
    assert layers == {"Conv2d", "ConvTranspose2d", "GroupNorm", "Linear"}  # a new kind of layer needs checking here
    x, t, eps = tiny_batch(3)
    alone = one_at_a_time(model, x, t, eps)
    with SampleLevelDP.per_sample_gradients(model) as wrapped:
        F.mse_loss(wrapped(x, t), eps).backward()
        for name, param in model.named_parameters():
            assert param.grad_sample.shape == (3, *param.shape), name
            for i in range(3):
                torch.testing.assert_close(param.grad_sample[i], alone[i][name], rtol=1e-4, atol=1e-6)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # the hooks are gone again


def test_a_dp_step_sums_the_clipped_gradients_over_the_expected_batch() -> None:
    model = build_model(parse_config(TINY_UNET))
    x, t, eps = tiny_batch(3, seed=1)
    alone = one_at_a_time(model, x, t, eps)
    norms = [torch.sqrt(sum(g.square().sum() for g in grads.values())) for grads in alone]
    clip = float(sorted(norms)[1])  # one image below the bound, two above
    dp = SampleLevelDP(clip=clip, noise_multiplier=0.0, sample_rate=0.5, expected_batch=4)
    stepper = Stepper(dict(model.named_parameters()), Recipe(lr=1e-3, grad_clip=1e-9), dp=dp)
    with SampleLevelDP.per_sample_gradients(model) as wrapped:
        stepper.step(F.mse_loss(wrapped(x, t), eps))
    for name, param in model.named_parameters():
        want = sum(g[name] * min(1.0, clip / float(n)) for g, n in zip(alone, norms, strict=True)) / 4
        torch.testing.assert_close(param.grad, want, rtol=1e-4, atol=1e-7)  # the global clip (1e-9) is not applied


def test_an_empty_batch_steps_on_noise_of_sigma_clip_over_the_expected_batch() -> None:
    model = build_model(parse_config(TINY_UNET))
    dp = SampleLevelDP(clip=0.5, noise_multiplier=2.0, sample_rate=0.1, expected_batch=4)
    grads = []
    for _ in range(2):
        torch.manual_seed(0)
        stepper = Stepper(dict(model.named_parameters()), Recipe(lr=1e-3), dp=dp)
        stepper.step(None)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert stepper.steps == 1
    assert float(grads[0].std()) == pytest.approx(2.0 * 0.5 / 4, rel=0.02)
    assert not torch.equal(grads[0], grads[1])  # the OS's entropy, not torch's seed
    with pytest.raises(ValueError, match="no DP-SGD"):
        Stepper(dict(model.named_parameters()), Recipe(lr=1e-3)).step(None)


# -- batches and accounting ---------------------------------------------------------------
def test_poisson_batches_hold_each_image_at_the_sample_rate_and_take_the_usual_step_count() -> None:
    dp = SampleLevelDP(clip=1.0, noise_multiplier=1.0, sample_rate=0.25, expected_batch=100)
    sizes = [len(b) for b in dp.batches(400, 300, torch.Generator().manual_seed(3))]
    assert len(sizes) == 300 and sum(sizes) / 300 == pytest.approx(100, rel=0.02)
    again = [len(b) for b in dp.batches(400, 300, torch.Generator().manual_seed(3))]
    assert sizes == again  # the batches follow the run's seed
    dealt = list(shuffled_batches(50, 8, 3, torch.Generator().manual_seed(0), torch.device("cpu"), dp=dp))
    assert len(dealt) == batches_per_call(50, 8, 3) == 21
    assert [done for _, done in dealt[:2]] == [0.0, 1 / 21]
    assert len(list(shuffled_batches(50, 8, 3, torch.Generator(), torch.device("cpu"), max_batches=5, dp=dp))) == 5


def test_a_sample_target_epsilon_is_spent_over_the_runs_steps_on_the_partition() -> None:
    cfg = parse_config({"train.rounds": 3, "train.batch-size": 16, "privacy.sample-clip": 1.0,
                        "privacy.sample-target-epsilon": 4.0})
    dp = SampleLevelDP.for_partition(cfg, 200)
    assert dp is not None and dp.sample_rate == 16 / 200 and dp.expected_batch == 16
    account = PrivacyAccount(cfg.privacy.delta)
    for _ in range(3):
        dp.account(account, batches_per_call(200, 16, 1))  # 13 steps a round
    assert 3.9 < account.epsilon() <= 4.0
    small = SampleLevelDP.for_partition(cfg, 8)  # a batch larger than the partition takes it whole
    assert small is not None and small.sample_rate == 1.0 and small.expected_batch == 8
    assert SampleLevelDP.for_partition(parse_config({}), 200) is None


@pytest.mark.parametrize(("overrides", "names"), [
    ({"privacy.sample-noise-multiplier": 1.0}, "privacy.sample-clip is 0"),
    ({"privacy.sample-clip": 1.0, "privacy.sample-noise-multiplier": 1.0, "privacy.sample-target-epsilon": 4.0},
     "both set"),
    ({"privacy.sample-clip": 1.0, "strategy.name": "collafuse"}, "collafuse"),
    ({"privacy.sample-clip": -1.0}, "privacy.sample-clip = -1.0"),
])
def test_dp_sgd_settings_that_cannot_hold_are_one_line_errors(overrides: dict[str, object], names: str) -> None:
    with pytest.raises(ConfigError, match=names) as err:
        parse_config(overrides)
    assert "\n" not in str(err.value)


def test_a_repeated_round_continues_the_account_of_the_round_before(tmp_path: Path) -> None:
    cfg = parse_config({"privacy.sample-clip": 1.0, "privacy.sample-noise-multiplier": 1.5})
    dp = SampleLevelDP(clip=1.0, noise_multiplier=1.5, sample_rate=0.1, expected_batch=10)
    sample_level_account(cfg, dp, 7, tmp_path, 0, 1)
    sample_level_account(cfg, dp, 7, tmp_path, 0, 2)
    again = sample_level_account(cfg, dp, 7, tmp_path, 0, 2)  # a resumed server sends round 2 again
    saved = load_node_round(tmp_path, DP_SGD_ACCOUNT)
    assert saved is not None and PrivacyAccount.from_state(saved["account"]).releases == 14  # type: ignore[arg-type]
    by_hand = PrivacyAccount(cfg.privacy.delta)
    by_hand.release(1.5, 0.1, 14)
    assert again[DP_SGD_EPSILON] == pytest.approx(by_hand.epsilon())


def test_the_round_reports_the_worst_clients_epsilon_and_the_summary_line_shows_it() -> None:
    records = [RecordDict({"m": MetricRecord({"num-examples": n, "train-loss": loss, DP_SGD_EPSILON: eps})})
               for n, loss, eps in ((10, 1.0, 3.0), (30, 2.0, 1.0))]
    merged = weighted_mean_over_clients(records, "num-examples")
    assert merged["train-loss"] == pytest.approx(1.75) and merged[DP_SGD_EPSILON] == 3.0
    row = {"round": 2, "train": {"train-loss": 1.75, DP_SGD_EPSILON: 3.0}, "round_s": 1.0}
    assert "DP-SGD ε 3.00 (worst client)" in summary_line(row, 4)  # type: ignore[arg-type]


# -- on the nodes -------------------------------------------------------------------------
@pytest.mark.usefixtures("task_identity")  # Messages are built outside a Flower run
def test_clients_train_with_dp_sgd_and_keep_their_own_account(tmp_path: Path) -> None:
    """UDec: DP-SGD over a personal model's every part; a global model's training is the same call."""
    run, initial, final = run_inprocess(tmp_path, nodes=2, **{
        "strategy.name": "udec", "train.rounds": 2, "privacy.sample-clip": 1.0,
        "privacy.sample-noise-multiplier": 1.0})
    steps = run.cfg.train.max_steps_per_round
    replies = [r.content.metric_records["metrics"] for r in run.replies if "metrics" in r.content.metric_records
               and "train-loss" in r.content.metric_records["metrics"]]
    sizes = {int(m["num-examples"]) for m in replies}  # type: ignore[call-overload]
    assert len(sizes) == 1  # two IID partitions of one size: one sample rate
    rate = 16 / sizes.pop()
    for node in run.node_ids:
        saved = load_node_round(run.state_dir(node), DP_SGD_ACCOUNT)
        assert saved is not None and saved["round"] == 2
        account = PrivacyAccount.from_state(saved["account"])  # type: ignore[arg-type]
        assert account.releases == 2 * steps and account.history[0][:2] == (1.0, rate)
    last = max(float(m[DP_SGD_EPSILON]) for m in replies)  # type: ignore[arg-type]
    by_hand = PrivacyAccount(run.cfg.privacy.delta)
    by_hand.release(1.0, rate, 2 * steps)
    assert last == pytest.approx(by_hand.epsilon())
    assert run.result.train_metrics_clientapp[2][DP_SGD_EPSILON] == pytest.approx(by_hand.epsilon())
    assert any(not torch.equal(torch.as_tensor(initial[k].numpy()), torch.as_tensor(final[k].numpy()))
               for k in final.keys())
