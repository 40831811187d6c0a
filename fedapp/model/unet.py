"""The FedDiffuse backbone: a ConvNeXt UNet with linear attention (see shared spec).

The model knows nothing about the noise schedule: it maps (x_t, t) to a prediction.
Its parts have stable names, because the federated methods exchange them by name:
``init_conv``, ``time_mlp`` and ``down_blocks`` form the encoder, ``mid_block`` the
bottleneck, ``up_blocks`` and ``final_conv`` the decoder.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

PART_NAMES: tuple[str, ...] = ("encoder", "bottleneck", "decoder")

# Top-level module name -> part. Every parameter belongs to exactly one part.
_MODULE_PART: dict[str, str] = {
    "init_conv": "encoder",
    "time_mlp": "encoder",
    "down_blocks": "encoder",
    "mid_block": "bottleneck",
    "up_blocks": "decoder",
    "final_conv": "decoder",
}


class SinusoidalTimeEmbedding(nn.Module):
    """Fixed sin/cos features of the timestep, as in the transformer position code."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        scale = math.log(10000) / max(half - 1, 1)
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -scale)
        args = t.float()[:, None] * freqs[None, :]
        emb = torch.cat((args.sin(), args.cos()), dim=-1)
        if self.dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb


class ConvNextBlock(nn.Module):
    """Depthwise 7x7 conv (+ time bias), then a GroupNorm-GELU MLP of 3x3 convs."""

    def __init__(self, dim_in: int, dim_out: int, time_dim: int | None, mult: int = 2) -> None:
        super().__init__()
        self.time_proj = (
            nn.Sequential(nn.GELU(), nn.Linear(time_dim, dim_in)) if time_dim else None
        )
        self.ds_conv = nn.Conv2d(dim_in, dim_in, 7, padding=3, groups=dim_in)
        self.net = nn.Sequential(
            nn.GroupNorm(1, dim_in),
            nn.Conv2d(dim_in, dim_out * mult, 3, padding=1),
            nn.GELU(),
            nn.GroupNorm(1, dim_out * mult),
            nn.Conv2d(dim_out * mult, dim_out, 3, padding=1),
        )
        self.res_conv = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ds_conv(x)
        if self.time_proj is not None and t_emb is not None:
            h = h + self.time_proj(t_emb)[:, :, None, None]
        return self.net(h) + self.res_conv(x)


class _Heads(nn.Module):
    """Shared 1x1 qkv projection for both attention flavours."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = dim_head**-0.5
        self.to_qkv = nn.Conv2d(dim, heads * dim_head * 3, 1, bias=False)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, _, h, w = x.shape
        q, k, v = self.to_qkv(x).chunk(3, dim=1)
        return tuple(z.reshape(b, self.heads, -1, h * w) for z in (q, k, v))  # type: ignore[return-value]


class Attention(_Heads):
    """Full softmax attention; used once, at the lowest resolution."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32) -> None:
        super().__init__(dim, heads, dim_head)
        self.to_out = nn.Conv2d(heads * dim_head, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = self.qkv(x)
        sim = torch.einsum("bhdi,bhdj->bhij", q * self.scale, k)
        attn = sim.softmax(dim=-1)
        out = torch.einsum("bhij,bhdj->bhdi", attn, v)
        return self.to_out(out.reshape(b, -1, h, w))


class LinearAttention(_Heads):
    """Attention linear in the number of pixels, for the high-resolution levels."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32) -> None:
        super().__init__(dim, heads, dim_head)
        self.to_out = nn.Sequential(nn.Conv2d(heads * dim_head, dim, 1), nn.GroupNorm(1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = self.qkv(x)
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return self.to_out(out.reshape(b, -1, h, w))


class PreNormResidual(nn.Module):
    """x + fn(GroupNorm(x))."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(1, dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(self.norm(x))


class DownLevel(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, time_dim: int, downsample: bool) -> None:
        super().__init__()
        self.block1 = ConvNextBlock(dim_in, dim_out, time_dim)
        self.block2 = ConvNextBlock(dim_out, dim_out, time_dim)
        self.attn = PreNormResidual(dim_out, LinearAttention(dim_out))
        self.sample = nn.Conv2d(dim_out, dim_out, 4, 2, 1) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.attn(self.block2(self.block1(x, t_emb), t_emb))
        return self.sample(skip), skip


class MidBlock(nn.Module):
    def __init__(self, dim: int, time_dim: int) -> None:
        super().__init__()
        self.block1 = ConvNextBlock(dim, dim, time_dim)
        self.attn = PreNormResidual(dim, Attention(dim))
        self.block2 = ConvNextBlock(dim, dim, time_dim)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        return self.block2(self.attn(self.block1(x, t_emb)), t_emb)


class UpLevel(nn.Module):
    def __init__(self, dim_skip: int, dim_out: int, time_dim: int) -> None:
        super().__init__()
        self.block1 = ConvNextBlock(dim_skip * 2, dim_out, time_dim)
        self.block2 = ConvNextBlock(dim_out, dim_out, time_dim)
        self.attn = PreNormResidual(dim_out, LinearAttention(dim_out))
        self.sample = nn.ConvTranspose2d(dim_out, dim_out, 4, 2, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        x = self.block1(torch.cat((x, skip), dim=1), t_emb)
        return self.sample(self.attn(self.block2(x, t_emb)))


class UNet(nn.Module):
    """ε-predictor ``model(x_t, t)``; see the module docstring for the part names."""

    def __init__(self, dim: int = 28, dim_mults: Iterable[int] = (1, 2, 4), channels: int = 1) -> None:
        super().__init__()
        mults = tuple(dim_mults)
        self.dim, self.dim_mults, self.channels = dim, mults, channels
        init_dim = max(dim // 3 * 2, 1)
        widths = [init_dim, *(dim * m for m in mults)]
        pairs = list(zip(widths[:-1], widths[1:]))
        time_dim = dim * 4

        self.init_conv = nn.Conv2d(channels, init_dim, 7, padding=3)
        self.time_mlp = nn.Sequential(
            SinusoidalTimeEmbedding(dim),
            nn.Linear(dim, time_dim),
            nn.GELU(),
            nn.Linear(time_dim, time_dim),
        )
        self.down_blocks = nn.ModuleList(
            DownLevel(a, b, time_dim, downsample=i < len(pairs) - 1) for i, (a, b) in enumerate(pairs)
        )
        self.mid_block = MidBlock(widths[-1], time_dim)
        # One level fewer than the down path; the full-resolution skip is never used.
        self.up_blocks = nn.ModuleList(UpLevel(b, a, time_dim) for a, b in reversed(pairs[1:]))
        self.final_conv = nn.Sequential(ConvNextBlock(widths[1], dim, None), nn.Conv2d(dim, channels, 1))

    @property
    def downscale(self) -> int:
        """Image sides must be divisible by this."""
        return 2 ** (len(self.dim_mults) - 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_emb = self.time_mlp(t)
        x = self.init_conv(x)
        skips = []
        for level in self.down_blocks:
            x, skip = level(x, t_emb)
            skips.append(skip)
        x = self.mid_block(x, t_emb)
        for level, skip in zip(self.up_blocks, reversed(skips[1:])):
            x = level(x, skip, t_emb)
        return self.final_conv(x)


def build_unet(dim: int, dim_mults: Iterable[int], channels: int, image_side: int) -> UNet:
    """A UNet for images of this side, with a clear error if the side doesn't fit the levels."""
    model = UNet(dim=dim, dim_mults=dim_mults, channels=channels)
    if image_side % model.downscale:
        raise ValueError(
            f"image side {image_side} is not divisible by {model.downscale}, "
            f"which model.dim-mults={','.join(map(str, model.dim_mults))} needs"
        )
    return model


def part_of(name: str) -> str:
    """The part ('encoder', 'bottleneck' or 'decoder') a state-dict key belongs to."""
    top = name.split(".", 1)[0]
    try:
        return _MODULE_PART[top]
    except KeyError:
        raise KeyError(f"state-dict key {name!r} belongs to no UNet part") from None


def unet_parts(model: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Parameter names of the encoder, bottleneck and decoder, in state-dict order."""
    keys = model.state_dict().keys() if isinstance(model, nn.Module) else model.keys()
    parts: dict[str, list[str]] = {p: [] for p in PART_NAMES}
    for key in keys:
        parts[part_of(key)].append(key)
    return parts


def part_sizes(model: nn.Module) -> dict[str, int]:
    """Number of parameters in each part."""
    state = model.state_dict()
    return {p: sum(state[k].numel() for k in keys) for p, keys in unet_parts(state).items()}
