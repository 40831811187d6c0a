"""CollaFuse's split of the chain: who trains and samples which timesteps, and what crosses over.

The server's shared denoiser owns t >= t_c, each client's own denoiser t < t_c. A client
draws (x_t, t, ε) for its batches, trains its own model on the draws below the cut and
sends the others, capped per round, to the server. At inference the server runs
x_T -> x_{t_c} and the client finishes. No Flower here: the ClientApp and the strategy
call these pieces (``fedapp.protocol.records`` encodes the upload), and the tests run them back to back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedapp.data.pixels import to_model_range
from fedapp.model.diffusion import Diffusion, Sampler
from fedapp.train.loop import Tally, TrainResult, shuffled_batches
from fedapp.train.optim import Recipe, Stepper

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel


@dataclass(frozen=True)
class Upload:
    """Server-bound training triples; ``x0`` is the real images behind them and never leaves the client."""

    x_t: torch.Tensor
    t: torch.Tensor
    target: torch.Tensor
    x0: torch.Tensor

    def __len__(self) -> int:
        return len(self.t)


@dataclass(frozen=True)
class ClientRound:
    """One round on a client: its own optimizer steps, and how many draws went each way."""

    own: TrainResult
    drawn: int  # every (x_t, t) pair drawn; those not in ``own.images`` had t >= t_c


def client_round(
    model: nn.Module,
    diffusion: Diffusion,
    images: torch.Tensor,
    t_cut: int,
    *,
    epochs: int,
    batch_size: int,
    recipe: Recipe,
    seed: int,
    device: torch.device,
    upload_cap: int,
    max_steps: int = 0,
    optimizer: Mapping[str, Any] | None = None,
    ema: EMAModel | None = None,
    progress: bool = False,
    desc: str = "collafuse client",
) -> tuple[ClientRound, Upload]:
    """Draw t ~ U{0..T-1} and ε per image; train on t < t_cut and keep up to ``upload_cap`` of the rest.

    ``max_steps`` > 0 caps the batches drawn. Once the upload is full and the client owns
    no timestep (t_cut = 0), drawing more would change nothing, so it stops. ``optimizer`` and
    ``ema`` as in :func:`~fedapp.train.loop.train_local`.
    """
    if len(images) == 0:
        raise ValueError("cannot train on an empty partition")
    model.to(device).train()
    stepper = Stepper(dict(model.named_parameters()), recipe, optimizer)
    if ema is not None:
        ema.to(device)
    order_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator(device=device).manual_seed(seed + 1)
    source = images.to(device)
    parts: dict[str, list[torch.Tensor]] = {"x_t": [], "t": [], "target": [], "x0": []}
    kept = drawn = 0
    own = Tally(device)
    for pick, done in shuffled_batches(len(images), batch_size, epochs, order_gen, device, max_batches=max_steps,
                                       progress=progress, desc=desc):
        x0 = to_model_range(source[pick])
        x_t, t, eps = diffusion.noised(x0, None, noise_gen)
        low = t < t_cut
        drawn += len(t)
        if bool(low.any()):
            loss = diffusion.loss_on(model, x_t[low], t[low], eps[low])
            stepper.step(loss, done)
            if ema is not None:
                ema.step(model.parameters())
            own.add(loss, int(low.sum()))
        high = (~low).nonzero().flatten()
        take = high[: max(upload_cap - kept, 0)]
        for name, tensor in (("x_t", x_t), ("t", t), ("target", eps), ("x0", x0)):
            parts[name].append(tensor[take].detach().cpu())
        kept += len(take)
        if t_cut == 0 and kept >= upload_cap:
            break
    upload = Upload(**{name: torch.cat(chunks) for name, chunks in parts.items()})
    return ClientRound(own=own.result(stepper), drawn=drawn), upload


def server_steps(
    model: nn.Module,
    stepper: Stepper,
    diffusion: Diffusion,
    x_t: torch.Tensor,
    t: torch.Tensor,
    target: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    ema: EMAModel | None = None,
) -> TrainResult:
    """``epochs`` shuffled passes over the pooled triples with the server's persistent optimizer;
    ``ema``, the server model's EMA, takes every step, as a client's own model's does."""
    model.to(device).train()
    if ema is not None:
        ema.to(device)
    gen = torch.Generator().manual_seed(seed)
    x_t, t, target = x_t.to(device), t.to(device), target.to(device)
    tally = Tally(device)
    for pick, done in shuffled_batches(len(t), batch_size, epochs, gen, device):
        loss = diffusion.loss_on(model, x_t[pick], t[pick], target[pick])
        stepper.step(loss, done)
        if ema is not None:
            ema.step(model.parameters())
        tally.add(loss, len(pick))
    return tally.result()


def chain_split(diffusion: Diffusion, t_cut: int, kind: Sampler, steps: int | None) -> tuple[int, int]:
    """(server, client) denoising steps per image on the sampler's grid."""
    return (len(diffusion.grid(kind, steps, diffusion.timesteps, t_cut)),
            len(diffusion.grid(kind, steps, t_cut, 0)))


def _batched(model: nn.Module, diffusion: Diffusion, x: torch.Tensor, t_start: int, t_stop: int, *,
             kind: Sampler, steps: int | None, generator: torch.Generator, device: torch.device,
             batch_size: int, eta: float) -> torch.Tensor:
    model.to(device)
    out = [
        diffusion.sample(model, x[first : first + batch_size].to(device), t_start, t_stop, kind=kind,
                         steps=steps, generator=generator, eta=eta).cpu()
        for first in range(0, len(x), batch_size)
    ]
    return torch.cat(out) if out else x.cpu()


def server_half(model: nn.Module, diffusion: Diffusion, n: int, shape: tuple[int, int, int], t_cut: int, *,
                kind: Sampler, steps: int | None, seed: int, device: torch.device, batch_size: int = 256,
                eta: float = 0.0) -> torch.Tensor:
    """x_T ~ N(0, I) run down to the cut: the state a client finishes from (x_T itself when t_cut = T)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = diffusion.prior((n, *shape), gen, device)
    return _batched(model, diffusion, x, diffusion.timesteps, t_cut, kind=kind, steps=steps, generator=gen,
                    device=device, batch_size=batch_size, eta=eta)


def client_half(model: nn.Module, diffusion: Diffusion, x: torch.Tensor, t_cut: int, *, kind: Sampler,
                steps: int | None, seed: int, device: torch.device, batch_size: int = 256,
                eta: float = 0.0) -> torch.Tensor:
    """The rest of the chain from the server's state to x0, with the client's own model."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return _batched(model, diffusion, x, t_cut, 0, kind=kind, steps=steps, generator=gen, device=device,
                    batch_size=batch_size, eta=eta)


def split_sample(server: nn.Module, client: nn.Module, diffusion: Diffusion, n: int,
                 shape: tuple[int, int, int], t_cut: int, *, kind: Sampler, steps: int | None,
                 server_seed: int, client_seed: int, device: torch.device, batch_size: int = 256,
                 eta: float = 0.0) -> torch.Tensor:
    """Both halves back to back in one process: what split inference over the network must equal."""
    x = server_half(server, diffusion, n, shape, t_cut, kind=kind, steps=steps, seed=server_seed,
                    device=device, batch_size=batch_size, eta=eta)
    return client_half(client, diffusion, x, t_cut, kind=kind, steps=steps, seed=client_seed, device=device,
                       batch_size=batch_size, eta=eta)

