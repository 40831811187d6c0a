"""Client-level DP: clipping, noise and accounting against hand-computed values, on mocked replies and in-process runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from opacus.accountants import RDPAccountant

from client_app.node import private_update
from fedapp.config import ConfigError, parse_config
from fedapp.eval.membership import loss_attack
from fedapp.privacy.accounting import PrivacyAccount, client_level_release, noise_for_epsilon
from fedapp.privacy.mechanism import add_noise, clip_update, update_norm
from fedapp.protocol.keys import DP_EPSILON
from strategies import build_strategy
from strategies.privacy import ClientLevelDP
from tests.support.mocks import reply_from

pytestmark = pytest.mark.usefixtures("task_identity")


# -- mechanism ----------------------------------------------------------------------------
def test_an_update_above_the_bound_is_scaled_onto_it_and_one_below_is_kept() -> None:
    old = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([0.0])}
    new = {"a": torch.tensor([4.0, 1.0]), "b": torch.tensor([4.0])}  # update (3, 0, 4): norm 5
    clipped, norm = clip_update(new, old, 1.0)
    assert norm == pytest.approx(5.0)
    assert torch.allclose(clipped["a"], torch.tensor([1.6, 1.0])) and torch.allclose(clipped["b"], torch.tensor([0.8]))
    assert update_norm(clipped, old) == pytest.approx(1.0)
    kept, _ = clip_update(new, old, 10.0)
    assert all(torch.equal(kept[k], new[k]) for k in new)
    with pytest.raises(ValueError, match="positive"):
        clip_update(new, old, 0.0)


def test_noise_has_the_asked_std_and_does_not_follow_the_global_seed() -> None:
    zeros = {"w": torch.zeros(200_000)}
    torch.manual_seed(0)
    first = add_noise(zeros, 0.3)["w"]
    torch.manual_seed(0)
    second = add_noise(zeros, 0.3)["w"]
    assert float(first.std()) == pytest.approx(0.3, rel=0.01) and abs(float(first.mean())) < 0.003
    assert not torch.equal(first, second)  # OS entropy: the run's seed cannot reproduce it
    assert torch.equal(add_noise(zeros, 0.0)["w"], zeros["w"])


# -- accounting ---------------------------------------------------------------------------
def hand_epsilon(sigma: float, releases: int, delta: float) -> float:
    """RDP of the Gaussian mechanism without subsampling, α·R/(2σ²), converted to (ε, δ) as Opacus does
    (Balle et al. 2020), minimised over Opacus's orders."""
    best = math.inf
    for alpha in RDPAccountant.DEFAULT_ALPHAS:
        rdp = releases * alpha / (2 * sigma**2)
        eps = rdp + math.log1p(-1 / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        best = min(best, eps)
    return best


def test_the_account_of_full_participation_matches_the_gaussian_rdp_by_hand() -> None:
    account = PrivacyAccount(delta=1e-5)
    assert account.epsilon() == 0.0
    for _ in range(10):
        account.release(2.0, 1.0)
    assert account.history == [(2.0, 1.0, 10)] and account.releases == 10
    assert account.epsilon() == pytest.approx(hand_epsilon(2.0, 10, 1e-5), rel=1e-6)
    again = PrivacyAccount.from_state(account.state())
    assert again.epsilon() == account.epsilon()
    sampled = PrivacyAccount(delta=1e-5)
    sampled.release(2.0, 0.5, count=10)
    assert sampled.epsilon() < account.epsilon()  # amplification by sampling


def test_a_target_epsilon_gives_a_multiplier_that_spends_it() -> None:
    sigma = noise_for_epsilon(4.0, 1e-5, 1.0, 10)
    spent = PrivacyAccount(1e-5)
    spent.release(sigma, 1.0, 10)
    assert 3.9 < spent.epsilon() <= 4.0
    cfg = parse_config({"privacy.clip": 1.0, "privacy.target-epsilon": 4.0, "train.rounds": 10})
    assert client_level_release(cfg) == (pytest.approx(sigma), 1.0)


# -- config -------------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "names"), [
    ({"privacy.noise-multiplier": 1.0}, "privacy.clip is 0"),
    ({"privacy.clip": 1.0, "strategy.name": "collafuse"}, "collafuse"),
    ({"privacy.clip": 1.0, "strategy.aggregation": "median"}, "strategy.aggregation"),
    ({"privacy.clip": 1.0, "privacy.noise-multiplier": 1.0, "privacy.target-epsilon": 4.0}, "both set"),
    ({"privacy.noise": "nobody"}, "privacy.noise"),
])
def test_privacy_settings_that_cannot_hold_are_one_line_errors(overrides: dict[str, object], names: str) -> None:
    with pytest.raises(ConfigError, match=names) as err:
        parse_config(overrides)
    assert "\n" not in str(err.value)


# -- the server's hooks -------------------------------------------------------------------
def record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()})


def reply(node: int, arrays: dict[str, np.ndarray], examples: int) -> Message:
    content = RecordDict({"arrays": record(arrays), "metrics": MetricRecord({"num-examples": examples,
                                                                           "train-loss": 1.0})})
    return reply_from(node, content)


def full_strategy(**privacy: object) -> object:
    cfg = parse_config({"strategy.min-nodes": 2, "train.rounds": 4,
                        **{f"privacy.{k}": v for k, v in privacy.items()}})
    return build_strategy(cfg)


def test_the_server_clips_each_update_and_averages_them_unweighted() -> None:
    strategy = full_strategy(clip=1.0)
    sent = record({"w": np.zeros(2)})
    strategy._sent, strategy._shapes = sent, {"w": (2,)}
    replies = [reply(1, {"w": np.array([3.0, 4.0])}, 10),  # norm 5: clipped to (0.6, 0.8)
               reply(2, {"w": np.array([0.0, -0.5])}, 90)]  # under the bound: kept
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert np.allclose(arrays["w"].numpy(), [0.3, 0.15])  # equal weights despite 10 vs 90 examples
    assert DP_EPSILON not in metrics  # clipping only: nothing accounted


def test_the_servers_noise_is_sigma_clip_over_m_and_every_round_is_accounted() -> None:
    strategy = full_strategy(**{"clip": 2.0, "noise-multiplier": 1.5})
    size = 100_000
    strategy._sent, strategy._shapes = record({"w": np.zeros(size)}), {"w": (size,)}
    for rnd in (1, 2):
        arrays, metrics = strategy.aggregate_train(rnd, [reply(n, {"w": np.zeros(size)}, 5) for n in (1, 2, 3, 4)])
        assert float(np.std(arrays["w"].numpy())) == pytest.approx(1.5 * 2.0 / 4, rel=0.02)
        assert metrics[DP_EPSILON] == pytest.approx(hand_epsilon(1.5, rnd, 1e-5), rel=1e-6)
    state = strategy.state()
    fresh = full_strategy(**{"clip": 2.0, "noise-multiplier": 1.5})
    fresh.restore(state)
    assert fresh.privacy.account.releases == 2  # a resumed run continues the same account


def test_with_the_clients_noise_the_server_neither_clips_nor_noises() -> None:
    dp = ClientLevelDP(clip=1.0, noise_multiplier=1.0, by_server=False, sample_rate=1.0,
                       account=PrivacyAccount(1e-5))
    replies = [reply(1, {"w": np.array([3.0, 4.0])}, 1)]
    dp.clip_replies(replies, record({"w": np.zeros(2)}), "arrays")
    assert np.allclose(replies[0].content["arrays"]["w"].numpy(), [3.0, 4.0])
    assert np.allclose(dp.noised(record({"w": np.ones(2)}), 1)["w"].numpy(), [1.0, 1.0])
    assert dp.released(None)[DP_EPSILON] == pytest.approx(hand_epsilon(1.0, 1, 1e-5), rel=1e-6)


def test_a_usplit_part_gets_noise_for_its_own_reporters() -> None:
    from fedapp.model.unet import UNet, unet_parts
    from fedapp.protocol.records import model_to_record

    cfg = parse_config({"strategy.name": "usplit", "strategy.min-nodes": 4, "privacy.clip": 1.0,
                        "privacy.noise-multiplier": 4.0})
    strategy = build_strategy(cfg)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = UNet(dim=8, dim_mults=(1, 2), channels=1)
    sent = model_to_record(model)
    strategy._global, strategy._keys = sent, unet_parts(model)
    strategy.tasks = {1: ("encoder",), 2: ("encoder",), 3: ("bottleneck", "decoder"), 4: ("decoder",)}
    replies = []
    for node, parts in strategy.tasks.items():
        keys = [k for p in parts for k in strategy._keys[p]]
        replies.append(reply(node, {k: sent[k].numpy() for k in keys}, 3))
    arrays, _ = strategy.aggregate_train(1, replies)
    for part, reporters in (("encoder", 2), ("bottleneck", 1), ("decoder", 2)):
        noise = np.concatenate([(arrays[k].numpy() - sent[k].numpy()).ravel() for k in strategy._keys[part]])
        assert float(noise.std()) == pytest.approx(4.0 / reporters, rel=0.15), part


# -- the client's side --------------------------------------------------------------------
def test_a_private_client_clips_its_update_and_adds_its_own_noise() -> None:
    from fedapp.model.unet import UNet

    model = UNet(dim=8, dim_mults=(1, 2), channels=1)
    received = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("up_blocks")}
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)  # every coordinate moved by 1: the update's norm is sqrt(#coordinates)
    plain = private_update(parse_config({}), model, received)
    assert plain["update-norm"] == pytest.approx(math.sqrt(sum(v.numel() for v in received.values())), rel=1e-5)
    clipped = private_update(parse_config({"privacy.clip": 0.5}), model, received)
    assert clipped == {} and update_norm({k: model.state_dict()[k] for k in received}, received) == pytest.approx(0.5)
    before = {k: model.state_dict()[k].clone() for k in received}
    private_update(parse_config({"privacy.clip": 0.5, "privacy.noise": "client", "privacy.noise-multiplier": 2.0}),
                   model, received)
    moved = torch.cat([(model.state_dict()[k] - received[k]).ravel() for k in received])
    assert float(moved.std()) == pytest.approx(2.0 * 0.5, rel=0.05)  # σ·clip on each coordinate
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items() if k not in received)


# -- the attack ---------------------------------------------------------------------------
def test_the_loss_attack_gives_the_hand_counted_auc_and_tpr() -> None:
    result = loss_attack(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.25, 0.4, 0.5, 0.6]))
    assert result.auc == pytest.approx(11 / 12) and result.tpr_at_1pct_fpr == pytest.approx(2 / 3)
    coin = loss_attack(torch.ones(50), torch.ones(50))
    assert coin.auc == pytest.approx(0.5)

