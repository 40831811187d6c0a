"""The client-level Gaussian mechanism over named tensors: clip an update, add noise.

An update is what a client sends minus what it received, over exactly the arrays that travel
(a sub-block method's shared parts, a USplit node's task). Clipping bounds one client's
influence on a mean of m updates to ``clip / m``; noise of standard deviation
``noise_multiplier * clip / m`` on that mean (the server's noise) or ``noise_multiplier * clip``
on each update (each client's own) is then a Gaussian mechanism with that multiplier.

Flower ships the same mechanism (``DifferentialPrivacyServerSideFixedClipping``,
``fixedclipping_mod``), but it pairs a reply's arrays with the global ones by position over
the whole model, calibrates every array to the number of sampled nodes, and its client mod
sees our transport's encoded payloads; our sub-block replies hold a subset of the arrays,
USplit averages each part over its own reporters, and a delta payload decodes only in our
handlers. So both ends call these functions on decoded float32 tensors instead.

The noise comes from a generator seeded with the operating system's entropy, never the run's
seed (which is in the config, so anyone could subtract noise drawn from it).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping

import torch


def update_norm(new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of ``new - old`` over all of ``new``'s tensors together."""
    total = sum(float((new[k].double() - old[k].double()).square().sum()) for k in new)
    return math.sqrt(total)


def clip_update(new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor],
                clip: float) -> tuple[dict[str, torch.Tensor], float]:
    """(``old + (new - old) * min(1, clip / ‖new - old‖)``, the norm before clipping), float32."""
    if clip <= 0:
        raise ValueError(f"the clipping bound must be positive, got {clip}")
    norm = update_norm(new, old)
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    clipped = {k: (old[k].float() + (new[k].float() - old[k].float()) * scale) for k in new}
    return clipped, norm


def noise_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded from the OS's entropy: noise nobody can reproduce from the config."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def add_noise(tensors: Mapping[str, torch.Tensor], std: float,
              generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Each tensor plus i.i.d. N(0, std²) noise (float32); ``std`` 0 returns float32 copies."""
    if std < 0:
        raise ValueError(f"noise std must be non-negative, got {std}")
    gen = generator if generator is not None else noise_generator()
    out = {}
    for key, value in tensors.items():
        value = value.detach().float().cpu()
        out[key] = value + std * torch.randn(value.shape, generator=gen) if std else value.clone()
    return out
