"""Tests for fedapp.model.unet: the paper's sizes, the encoder/bottleneck/decoder split that
the federated methods exchange by name, and the forward pass."""

from __future__ import annotations

import pytest
import torch

from fedapp.model.unet import PART_NAMES, UNet, build_unet, part_of, part_sizes, unet_parts

PART_PREFIXES: dict[str, tuple[str, ...]] = {
    "encoder": ("init_conv.", "time_mlp.", "down_blocks."),
    "bottleneck": ("mid_block.",),
    "decoder": ("up_blocks.", "final_conv."),
}

# (dim, dim_mults, channels): small models covering 2, 3 and 4 levels and RGB.
CONFIGS: list[tuple[int, tuple[int, ...], int]] = [
    (8, (1, 2), 1),
    (8, (1, 2, 4), 1),
    (8, (1, 2, 4, 8), 1),
    (8, (1, 2, 4), 3),
]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- sizes


def test_paper_fashion_mnist_size_and_split() -> None:
    model = UNet(dim=28, dim_mults=(1, 2, 4), channels=1)
    total = n_params(model)
    assert total == 2_996_315  # "about 3.0 M" in the spec

    sizes = part_sizes(model)
    assert set(sizes) == set(PART_NAMES)
    assert sum(sizes.values()) == total
    share = {part: n / total for part, n in sizes.items()}
    assert 0.42 <= share["encoder"] <= 0.44
    assert 0.32 <= share["bottleneck"] <= 0.35
    assert 0.23 <= share["decoder"] <= 0.25


def test_paper_fashion_mnist_widths() -> None:
    """Spec: widths 18 -> 28 -> 56 -> 112, time embedding 4*dim."""
    model = UNet(dim=28, dim_mults=(1, 2, 4), channels=1)
    assert model.init_conv.out_channels == 18
    assert [lvl.block1.net[-1].out_channels for lvl in model.down_blocks] == [28, 56, 112]
    assert model.time_mlp[-1].out_features == 112
    assert len(model.up_blocks) == 2  # one level fewer than the down path


def test_celeba_size() -> None:
    model = UNet(64, (1, 2, 4), 3)
    total = n_params(model)
    assert total == 14_892_477
    assert 14_800_000 <= total <= 15_000_000
    sizes = part_sizes(model)
    assert sum(sizes.values()) == total
    # "the same split" as Fashion-MNIST
    assert 0.42 <= sizes["encoder"] / total <= 0.44
    assert 0.32 <= sizes["bottleneck"] / total <= 0.35
    assert 0.23 <= sizes["decoder"] / total <= 0.25


# ----------------------------------------------------------------------------- parts


@pytest.mark.parametrize("dim, mults, channels", CONFIGS)
def test_parts_partition_the_state_dict(dim: int, mults: tuple[int, ...], channels: int) -> None:
    model = UNet(dim=dim, dim_mults=mults, channels=channels)
    parts = unet_parts(model)
    assert list(parts) == ["encoder", "bottleneck", "decoder"]

    keys = list(model.state_dict().keys())
    flat = [k for names in parts.values() for k in names]
    assert len(flat) == len(set(flat)), "a key is in two parts"
    assert set(flat) == set(keys)
    assert all(parts[p] for p in PART_NAMES), "every part holds parameters"
    # A state dict (Mapping) gives the same answer as the module.
    assert unet_parts(model.state_dict()) == parts


@pytest.mark.parametrize("dim, mults, channels", CONFIGS)
def test_state_dict_has_no_buffers(dim: int, mults: tuple[int, ...], channels: int) -> None:
    model = UNet(dim=dim, dim_mults=mults, channels=channels)
    assert list(model.state_dict().keys()) == [n for n, _ in model.named_parameters()]
    assert list(model.buffers()) == []


@pytest.mark.parametrize("dim, mults, channels", CONFIGS)
def test_part_naming(dim: int, mults: tuple[int, ...], channels: int) -> None:
    model = UNet(dim=dim, dim_mults=mults, channels=channels)
    for part, names in unet_parts(model).items():
        for name in names:
            assert name.startswith(PART_PREFIXES[part]), (part, name)
            assert part_of(name) == part


def test_part_of_unknown_key() -> None:
    with pytest.raises(KeyError, match="bogus.weight"):
        part_of("bogus.weight")
    # Only the top-level module name counts: a prefix lookalike is not a part.
    with pytest.raises(KeyError):
        part_of("init_convolution.weight")


def test_part_sizes_match_parameter_counts() -> None:
    model = UNet(dim=8, dim_mults=(1, 2), channels=1)
    params = dict(model.named_parameters())
    for part, names in unet_parts(model).items():
        assert part_sizes(model)[part] == sum(params[n].numel() for n in names)


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize(
    "dim, mults, channels, batch, side",
    [
        (8, (1, 2), 1, 2, 8),
        (8, (1, 2), 1, 1, 16),
        (8, (1, 2, 4), 1, 3, 16),
        (8, (1, 2, 4), 1, 2, 12),  # a side that is not a power of two
        (8, (1, 2, 4), 3, 2, 8),
        (8, (1, 2, 4, 8), 1, 2, 16),
    ],
)
def test_forward_keeps_shape(dim: int, mults: tuple[int, ...], channels: int, batch: int,
                             side: int) -> None:
    torch.manual_seed(0)
    model = UNet(dim=dim, dim_mults=mults, channels=channels)
    x = torch.randn(batch, channels, side, side)
    t = torch.randint(0, 1000, (batch,))
    with torch.no_grad():
        out = model(x, t)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_output_depends_on_t() -> None:
    torch.manual_seed(0)
    model = UNet(dim=8, dim_mults=(1, 2), channels=1).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        early = model(x, torch.tensor([10, 10]))
        late = model(x, torch.tensor([900, 900]))
        again = model(x, torch.tensor([10, 10]))
    assert torch.equal(early, again)
    assert not torch.allclose(early, late, atol=1e-4)


def test_output_per_example_uses_its_own_t() -> None:
    """A batch with mixed t equals the examples run one by one."""
    torch.manual_seed(0)
    model = UNet(dim=8, dim_mults=(1, 2), channels=1).eval()
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([5, 700])
    with torch.no_grad():
        batched = model(x, t)
        single = torch.cat([model(x[i : i + 1], t[i : i + 1]) for i in range(2)])
    assert torch.allclose(batched, single, atol=1e-5)


# ----------------------------------------------------------------------------- build_unet


@pytest.mark.parametrize("mults, side", [((1, 2, 4), 30), ((1, 2), 7), ((1, 2, 4, 8), 28)])
def test_build_unet_rejects_bad_side(mults: tuple[int, ...], side: int) -> None:
    with pytest.raises(ValueError) as info:
        build_unet(8, mults, 1, side)
    message = str(info.value)
    assert str(side) in message
    assert ",".join(map(str, mults)) in message


@pytest.mark.parametrize("mults, side", [((1, 2, 4), 28), ((1, 2), 7 * 2), ((1, 2, 4, 8), 32)])
def test_build_unet_accepts_good_side(mults: tuple[int, ...], side: int) -> None:
    model = build_unet(8, mults, 3, side)
    assert isinstance(model, UNet)
    assert model.downscale == 2 ** (len(mults) - 1)
    assert model.channels == 3 and model.dim_mults == mults
