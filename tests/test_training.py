"""Tests for fedapp.train.loop: step/image counts, partial training, determinism, the
held-out denoising loss and device selection."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fedapp.model.diffusion import Diffusion
from fedapp.model.unet import UNet, unet_parts
from fedapp.train.loop import TrainResult, denoising_loss, pick_device, train_local
from fedapp.train.optim import Recipe

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def initial() -> UNet:
    """A tiny model; tests train deep copies so every test starts from the same weights."""
    torch.manual_seed(0)
    return UNet(dim=8, dim_mults=(1, 2), channels=1)


@pytest.fixture(scope="module")
def diffusion() -> Diffusion:
    return Diffusion()


def fake_images(n: int, side: int = 8, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, side, side), generator=gen, dtype=torch.uint8)


def train(model: UNet, diffusion: Diffusion, images: torch.Tensor, **kwargs: object) -> TrainResult:
    options: dict = {"epochs": 1, "batch_size": 4, "recipe": Recipe(lr=1e-3), "seed": 0, "device": CPU}
    options.update(kwargs)
    return train_local(model, diffusion, images, **options)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- counts


@pytest.mark.parametrize("n, batch, epochs", [(10, 4, 2), (8, 4, 1), (5, 8, 3), (1, 1, 1)])
def test_step_and_image_counts(initial: UNet, diffusion: Diffusion, n: int, batch: int,
                               epochs: int) -> None:
    result = train(copy.deepcopy(initial), diffusion, fake_images(n), epochs=epochs,
                   batch_size=batch)
    assert result.steps == math.ceil(n / batch) * epochs
    assert result.images == n * epochs
    assert math.isfinite(result.loss) and result.loss > 0
    assert result.seconds > 0


def test_max_steps_caps_steps(initial: UNet, diffusion: Diffusion) -> None:
    # Unbounded this would be ceil(10/4) * 3 = 9 steps; batches run 4, 4, 2 | 4, ...
    result = train(copy.deepcopy(initial), diffusion, fake_images(10), epochs=3, batch_size=4,
                   max_steps=4)
    assert result.steps == 4
    assert result.images == 4 + 4 + 2 + 4
    # a cap above the natural count changes nothing
    loose = train(copy.deepcopy(initial), diffusion, fake_images(10), epochs=1, batch_size=4,
                  max_steps=100)
    assert loose.steps == 3 and loose.images == 10


def test_loss_is_weighted_mean_of_batches(initial: UNet, diffusion: Diffusion) -> None:
    """One step: the reported loss is exactly that batch's loss before the update."""
    model = copy.deepcopy(initial)
    images = fake_images(3)
    result = train(model, diffusion, images, batch_size=3, seed=5)
    # Recompute: the batch order is randperm(seed), the noise uses seed + 1.
    from fedapp.data.pixels import to_model_range

    order = torch.randperm(3, generator=torch.Generator().manual_seed(5))
    ref = copy.deepcopy(initial).train()
    expected = diffusion.loss(ref, to_model_range(images[order]), None,
                              torch.Generator().manual_seed(6))
    assert result.loss == pytest.approx(expected.item(), rel=1e-5)


# ----------------------------------------------------------------------------- trainable


def test_trainable_subset_only_changes_named(initial: UNet, diffusion: Diffusion) -> None:
    model = copy.deepcopy(initial)
    before = state(model)
    encoder = unet_parts(model)["encoder"]
    named = [n for n in encoder if n.startswith(("init_conv.", "time_mlp."))]
    assert named  # the tiny model has these

    train(model, diffusion, fake_images(8), trainable=named)
    after = state(model)
    for name in before:
        if name in named:
            assert not torch.equal(before[name], after[name]), f"{name} did not train"
        else:
            assert torch.equal(before[name], after[name]), f"{name} changed but was frozen"
    assert all(p.requires_grad for p in model.parameters())


def test_default_trains_every_part(initial: UNet, diffusion: Diffusion) -> None:
    model = copy.deepcopy(initial)
    before = state(model)
    train(model, diffusion, fake_images(8))
    after = state(model)
    for part, names in unet_parts(model).items():
        changed = sum(not torch.equal(before[n], after[n]) for n in names)
        assert changed == len(names), f"{len(names) - changed} {part} tensors did not train"
    assert all(p.requires_grad for p in model.parameters())


def test_frozen_flags_are_restored_even_for_previously_frozen(initial: UNet,
                                                              diffusion: Diffusion) -> None:
    model = copy.deepcopy(initial)
    for p in model.mid_block.parameters():
        p.requires_grad_(False)
    train(model, diffusion, fake_images(4), trainable=unet_parts(model)["decoder"])
    assert all(p.requires_grad for p in model.parameters())


def test_failed_call_leaves_requires_grad_intact(initial: UNet, diffusion: Diffusion) -> None:
    model = copy.deepcopy(initial)
    with pytest.raises(ValueError):
        train(model, diffusion, fake_images(4), trainable=["bogus.weight"])
    assert all(p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------- determinism


def test_same_seed_bit_identical_different_seed_not(initial: UNet, diffusion: Diffusion) -> None:
    images = fake_images(12)
    runs = {}
    for label, seed in (("a", 3), ("b", 3), ("c", 4)):
        model = copy.deepcopy(initial)
        result = train(model, diffusion, images, epochs=2, seed=seed)
        runs[label] = (state(model), result.loss)
    assert same_weights(runs["a"][0], runs["b"][0])
    assert runs["a"][1] == runs["b"][1]
    assert not same_weights(runs["a"][0], runs["c"][0])


def test_empty_images_raise(initial: UNet, diffusion: Diffusion) -> None:
    empty = torch.empty((0, 1, 8, 8), dtype=torch.uint8)
    with pytest.raises(ValueError):
        train(copy.deepcopy(initial), diffusion, empty)
    with pytest.raises(ValueError):
        denoising_loss(copy.deepcopy(initial), diffusion, empty, batch_size=4, seed=0, device=CPU)


# ----------------------------------------------------------------------------- denoising_loss


def test_denoising_loss_deterministic(initial: UNet, diffusion: Diffusion) -> None:
    model = copy.deepcopy(initial).train()
    images = fake_images(10, seed=1)
    first = denoising_loss(model, diffusion, images, batch_size=4, seed=0, device=CPU)
    second = denoising_loss(model, diffusion, images, batch_size=4, seed=0, device=CPU)
    other = denoising_loss(model, diffusion, images, batch_size=4, seed=1, device=CPU)
    assert first == second
    assert first != other
    assert math.isfinite(first) and first > 0
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())  # no_grad


def test_denoising_loss_uses_t_range(initial: UNet, diffusion: Diffusion) -> None:
    """Near t = T, x_t is almost pure noise; the loss differs from the one near t = 0."""
    model = copy.deepcopy(initial)
    images = fake_images(8, seed=2)
    low = denoising_loss(model, diffusion, images, batch_size=8, seed=0, device=CPU,
                         t_range=(0, 10))
    high = denoising_loss(model, diffusion, images, batch_size=8, seed=0, device=CPU,
                          t_range=(990, 1000))
    assert low != pytest.approx(high, rel=1e-3)


# ----------------------------------------------------------------------------- devices


def test_pick_device_auto() -> None:
    if torch.cuda.is_available():
        expected = "cuda"
    elif torch.backends.mps.is_available():
        expected = "mps"
    else:
        expected = "cpu"
    assert pick_device("auto").type == expected
    assert pick_device().type == expected


def test_pick_device_cpu() -> None:
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_pick_device_cuda_without_gpu() -> None:
    with pytest.raises(RuntimeError, match="cuda"):
        pick_device("cuda")
