"""Tests for fedapp.model.diffusion: schedule, forward noising, loss, timestep grids and the
stretch-wise reverse chain (CollaFuse's cut), plus a short real-data training check."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from fedapp.config import DataConfig, DiffusionConfig
from fedapp.data.pixels import to_model_range
from fedapp.model.diffusion import Diffusion
from fedapp.model.unet import UNet
from tests.support.markers import needs_fmnist

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def tiny_model() -> UNet:
    torch.manual_seed(0)
    return UNet(dim=8, dim_mults=(1, 2), channels=1).eval()


def images(batch: int = 4, side: int = 8, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, side, side, generator=gen) * 2 - 1


# ----------------------------------------------------------------------------- schedule


def test_linear_schedule() -> None:
    diffusion = Diffusion()
    betas = diffusion.scheduler.betas
    assert len(betas) == 1000
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-5)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-5)
    steps = betas[1:] - betas[:-1]
    assert torch.allclose(steps, torch.full_like(steps, (0.02 - 1e-4) / 999), atol=1e-7)
    assert diffusion.scheduler.config.prediction_type == "epsilon"


def test_from_config() -> None:
    diffusion = Diffusion.from_config(DiffusionConfig(timesteps=50, beta_end=0.03, loss="mse"))
    assert diffusion.timesteps == 50
    assert len(diffusion.scheduler.betas) == 50
    assert diffusion.scheduler.betas[-1].item() == pytest.approx(0.03, rel=1e-5)
    assert diffusion.loss_kind == "mse"


# ----------------------------------------------------------------------------- noising


def test_noised_respects_range() -> None:
    diffusion = Diffusion()
    x0 = images(batch=512)
    _, t, _ = diffusion.noised(x0, (200, 300), torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.shape == (512,)
    assert int(t.min()) >= 200 and int(t.max()) < 300
    assert len(t.unique()) > 50  # drawn over the range, not one value

    _, t_one, _ = diffusion.noised(x0, (7, 8), torch.Generator().manual_seed(0))
    assert set(t_one.tolist()) == {7}


def test_noised_is_the_forward_process() -> None:
    diffusion = Diffusion()
    x0 = images(batch=6)
    x_t, t, eps = diffusion.noised(x0, None, torch.Generator().manual_seed(1))
    abar = diffusion.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * eps, atol=1e-6)
    # same generator seed, same draw
    again = diffusion.noised(x0, None, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip((x_t, t, eps), again))


@pytest.mark.parametrize("t_range", [(5, 5), (-1, 10), (0, 1001), (10, 5)])
def test_noised_rejects_bad_range(t_range: tuple[int, int]) -> None:
    with pytest.raises(ValueError):
        Diffusion().noised(images(), t_range)


# ----------------------------------------------------------------------------- loss


def test_loss_kinds_and_huber_by_hand(tiny_model: UNet) -> None:
    x0 = images()
    huber = Diffusion(loss="huber")
    mse = Diffusion(loss="mse")
    with torch.no_grad():
        l_huber = huber.loss(tiny_model, x0, generator=torch.Generator().manual_seed(3))
        l_mse = mse.loss(tiny_model, x0, generator=torch.Generator().manual_seed(3))
        assert l_huber.item() != pytest.approx(l_mse.item(), rel=1e-3)

        x_t, t, eps = huber.noised(x0, None, torch.Generator().manual_seed(3))
        pred = tiny_model(x_t, t)
        assert l_huber.item() == pytest.approx(F.smooth_l1_loss(pred, eps).item(), rel=1e-6)
        assert l_mse.item() == pytest.approx(F.mse_loss(pred, eps).item(), rel=1e-6)


def test_loss_uses_t_range(tiny_model: UNet) -> None:
    diffusion = Diffusion()
    x0 = images()
    with torch.no_grad():
        low = diffusion.loss(tiny_model, x0, (0, 10), torch.Generator().manual_seed(0))
        x_t, t, eps = diffusion.noised(x0, (0, 10), torch.Generator().manual_seed(0))
        assert low.item() == pytest.approx(F.smooth_l1_loss(tiny_model(x_t, t), eps).item(), rel=1e-6)


# ----------------------------------------------------------------------------- grids


def test_ddpm_grid_is_full_chain() -> None:
    assert Diffusion().grid("ddpm") == list(range(999, -1, -1))


def test_ddim_grid() -> None:
    grid = Diffusion().grid("ddim", 50)
    assert len(grid) == 50
    assert grid[0] == 999
    assert all(a > b for a, b in zip(grid, grid[1:]))
    assert grid[-1] >= 0


@pytest.mark.parametrize("kind, steps", [("ddim", 50), ("ddim", 8), ("ddpm", None)])
def test_grid_stretch_keeps_entries_in_range(kind: str, steps: int | None) -> None:
    diffusion = Diffusion()
    full = diffusion.grid(kind, steps)  # type: ignore[arg-type]
    part = diffusion.grid(kind, steps, t_start=500, t_stop=200)  # type: ignore[arg-type]
    assert part == [t for t in full if 200 <= t < 500]
    assert part  # every grid here has entries in [200, 500)
    # the two stretches on either side of a cut cover the full grid, in order
    upper = diffusion.grid(kind, steps, t_stop=500)  # type: ignore[arg-type]
    lower = diffusion.grid(kind, steps, t_start=500)  # type: ignore[arg-type]
    assert upper + lower == full


@pytest.mark.parametrize("t_start, t_stop", [(100, 200), (1001, 0), (500, -1)])
def test_grid_rejects_bad_stretch(t_start: int, t_stop: int) -> None:
    with pytest.raises(ValueError):
        Diffusion().grid("ddim", 10, t_start=t_start, t_stop=t_stop)


@pytest.mark.parametrize("steps", [0, -1, 1001])
def test_sampler_rejects_bad_steps(steps: int) -> None:
    with pytest.raises(ValueError):
        Diffusion().sampler("ddim", steps)


def test_sampler_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="bogus"):
        Diffusion().sampler("bogus", 10)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize(
    "kind, timesteps, steps, cut",
    [("ddim", 1000, 20, 500), ("ddim", 1000, 20, 449), ("ddpm", 50, None, 20)],
)
def test_stretches_compose_to_full_chain(tiny_model: UNet, kind: str, timesteps: int,
                                         steps: int | None, cut: int) -> None:
    diffusion = Diffusion(timesteps=timesteps)
    x_T = diffusion.prior((2, 1, 8, 8), torch.Generator().manual_seed(0))

    full = diffusion.sample(tiny_model, x_T, kind=kind, steps=steps,  # type: ignore[arg-type]
                            generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    x_cut = diffusion.sample(tiny_model, x_T, t_start=timesteps, t_stop=cut, kind=kind,  # type: ignore[arg-type]
                             steps=steps, generator=gen)
    composed = diffusion.sample(tiny_model, x_cut, t_start=cut, t_stop=0, kind=kind,  # type: ignore[arg-type]
                                steps=steps, generator=gen)

    assert not torch.allclose(x_cut, x_T)  # the first stretch did run
    assert not torch.allclose(composed, x_cut)  # and so did the second
    assert torch.allclose(full, composed, atol=1e-5)


def test_ddpm_sampling_uses_generator(tiny_model: UNet) -> None:
    diffusion = Diffusion(timesteps=20)
    x_T = diffusion.prior((1, 1, 8, 8), torch.Generator().manual_seed(0))
    a = diffusion.sample(tiny_model, x_T, kind="ddpm", generator=torch.Generator().manual_seed(1))
    b = diffusion.sample(tiny_model, x_T, kind="ddpm", generator=torch.Generator().manual_seed(1))
    c = diffusion.sample(tiny_model, x_T, kind="ddpm", generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_empty_stretch_returns_input(tiny_model: UNet, kind: str) -> None:
    diffusion = Diffusion()
    x = torch.randn(2, 1, 8, 8)
    for t in (0, 500, 1000):
        out = diffusion.sample(tiny_model, x, t_start=t, t_stop=t, kind=kind, steps=10)  # type: ignore[arg-type]
        assert torch.equal(out, x)


def test_sample_restores_training_mode() -> None:
    model = UNet(dim=8, dim_mults=(1, 2), channels=1).train()
    Diffusion(timesteps=10).sample(model, torch.randn(1, 1, 8, 8), kind="ddim", steps=2)
    assert model.training


# ----------------------------------------------------------------------------- real data


@needs_fmnist
def test_loss_goes_down_on_fashion_mnist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from fedapp.data import sources as datasets
    from fedapp.data.sources import load_split
    from fedapp.train.loop import denoising_loss

    # Read the Debian copy only: no home cache, no download.
    monkeypatch.setenv("FEDAPP_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST_DIR", REAL_FMNIST)
    load_split.cache_clear()
    try:
        data = load_split(DataConfig(download=False), "train")
    finally:
        load_split.cache_clear()
    assert data.images.shape[1:] == (1, 28, 28)
    train, held_out = data.images[:256], data.images[256:384]

    torch.manual_seed(0)
    model = UNet(dim=12, dim_mults=(1, 2, 4), channels=1)
    diffusion = Diffusion()
    cpu = torch.device("cpu")
    before = denoising_loss(model, diffusion, held_out, batch_size=128, seed=0, device=cpu)

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    losses: list[float] = []
    model.train()
    for step in range(40):
        first = (step * 32) % len(train)
        loss = diffusion.loss(model, to_model_range(train[first : first + 32]), generator=gen)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    after = denoising_loss(model, diffusion, held_out, batch_size=128, seed=0, device=cpu)
    assert statistics.mean(losses[-10:]) < 0.8 * statistics.mean(losses[:10]), losses
    assert after < before


@pytest.mark.parametrize("t_start, t_stop", [(100, 900), (5000, 0), (10, -1)])
def test_sample_rejects_an_invalid_stretch(t_start: int, t_stop: int) -> None:
    diffusion = Diffusion()
    model = UNet(8, (1, 2), 1)
    with pytest.raises(ValueError, match="invalid stretch"):
        diffusion.sample(model, torch.zeros(1, 1, 8, 8), t_start=t_start, t_stop=t_stop)


class _OracleEps(torch.nn.Module):
    """The exact ε-predictor for data that is one fixed image: any sampler must return it."""

    def __init__(self, diffusion: Diffusion, target: torch.Tensor) -> None:
        super().__init__()
        self.abar = diffusion.scheduler.alphas_cumprod
        self.target = target

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.abar[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * self.target) / (1 - a).sqrt()


@pytest.mark.parametrize("kind, steps, eta", [("ddim", 50, 0.0), ("ddim", 8, 0.0), ("ddim", 50, 1.0),
                                             ("ddpm", None, 0.0), ("ddpm", 50, 0.0)])
def test_sampler_and_training_noise_agree_on_the_schedule(kind: str, steps: int | None, eta: float) -> None:
    """An off-by-one between add_noise's t and the sampler's t would leave visible error.

    Strided DDPM (50 of 1000 steps) and stochastic DDIM (η = 1) must land on the target too.
    """
    diffusion = Diffusion()
    target = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(1)) * 2 - 1
    gen = torch.Generator().manual_seed(0)
    oracle = _OracleEps(diffusion, target)
    full = diffusion.sample(oracle, diffusion.prior(target.shape, gen), kind=kind, steps=steps, generator=gen,
                            eta=eta)
    assert (full - target).abs().max() < 1e-4
    x_c = diffusion.sample(oracle, diffusion.prior(target.shape, gen), t_stop=300, kind=kind, steps=steps,
                           generator=gen, eta=eta)
    split = diffusion.sample(oracle, x_c, t_start=300, kind=kind, steps=steps, generator=gen, eta=eta)
    assert (split - target).abs().max() < 1e-4


def test_ddim_steps_must_divide_the_chain() -> None:
    with pytest.raises(ValueError, match="divide"):
        Diffusion().sampler("ddim", 7)


def test_generate_zero_images_is_an_empty_batch_not_an_error() -> None:
    from fedapp.config import parse_config
    from fedapp.model.build import build_diffusion, build_model
    from fedapp.model.sampling import generate

    cfg = parse_config({"model.dim": 8, "model.dim-mults": "1,2"})
    out = generate(build_model(cfg, seed=0), build_diffusion(cfg), 0, (1, 28), steps=2)
    assert out.shape == (0, 1, 28, 28)
