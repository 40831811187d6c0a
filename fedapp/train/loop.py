"""Local DDPM training and the held-out denoising loss, as plain PyTorch loops.

One epoch loop serves every trainer: :func:`shuffled_batches` deals the index batches of
E shuffled passes (with a progress bar in steps and images/s, and the share of the call done,
which the lr decay reads), :class:`Tally` sums the loss on the device and times the work, and a
:class:`~fedapp.train.optim.Stepper` takes each step (warm-up and clipping included). Local
training (FedDiffuse and the centralized baseline) and both halves of CollaFuse
(``fedapp.train.collafuse``) are built from them. An EMA, when given, is updated after every step.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fedapp.data.pixels import to_model_range
from fedapp.model.diffusion import Diffusion, TimeRange
from fedapp.privacy.dpsgd import batches_per_call
from fedapp.train.optim import Recipe, Stepper

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel

    from fedapp.privacy.dpsgd import SampleLevelDP


@dataclass(frozen=True)
class TrainResult:
    loss: float
    steps: int
    images: int
    seconds: float
    optimizer: dict[str, Any] | None = None  # the Stepper's state after the last step, to continue from

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def shuffled_batches(n: int, batch_size: int, epochs: int, generator: torch.Generator, device: torch.device, *,
                     max_batches: int = 0, progress: bool = False, desc: str = "",
                     dp: SampleLevelDP | None = None) -> Iterator[tuple[torch.Tensor, float]]:
    """Index batches of ``epochs`` passes over ``n`` items, each pass in a fresh order from ``generator``.

    At most ``max_batches`` (0: all). Each batch comes with the share of the call's batches dealt
    before it (0 for the first), for the lr decay. With ``dp`` (DP-SGD) as many Poisson batches
    instead, each image in each with DP-SGD's sample rate (a batch may be empty).
    """
    total = batches_per_call(n, batch_size, epochs, max_batches)
    picks = dp.batches(n, total, generator) if dp is not None else _passes(n, batch_size, epochs, generator, device)
    dealt = images = 0
    with tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False) as bar:
        for pick in picks:
            if dealt == total:
                return
            yield pick.to(device), dealt / total  # a pass's order is on the device already: no copy
            dealt, images = dealt + 1, images + len(pick)
            bar.update()
            if progress:
                bar.set_postfix_str(f"{images / max(bar.format_dict['elapsed'], 1e-9):.0f} img/s", refresh=False)


def _passes(n: int, batch_size: int, epochs: int, generator: torch.Generator,
            device: torch.device) -> Iterator[torch.Tensor]:
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(device)  # once a pass, not once a batch
        yield from order.split(batch_size)


@dataclass
class Tally:
    """The example-weighted loss, summed on the device so the host never waits for a step."""

    device: torch.device
    steps: int = 0
    seen: int = 0
    total: torch.Tensor = field(init=False)
    start: float = field(init=False, default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.total = torch.zeros((), device=self.device)

    def add(self, loss: torch.Tensor | None, count: int) -> None:
        """One step's loss over ``count`` images (None: an empty DP-SGD batch, a step of noise alone)."""
        if loss is not None:
            self.total += loss.detach() * count
        self.seen += count
        self.steps += 1

    def result(self, stepper: Stepper | None = None) -> TrainResult:
        mean = self.total.item() / self.seen if self.seen else 0.0  # waits for the last step
        return TrainResult(loss=mean, steps=self.steps, images=self.seen, seconds=time.perf_counter() - self.start,
                           optimizer=stepper.state_dict() if stepper is not None else None)


def pick_device(name: str = "auto") -> torch.device:
    """'auto' takes a GPU when there is one, so a GPU machine needs no setting."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device = 'cuda' but no CUDA GPU is visible to this process")
    return torch.device(name)


def train_local(
    model: nn.Module,
    diffusion: Diffusion,
    images: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    recipe: Recipe,
    seed: int,
    device: torch.device,
    max_steps: int = 0,
    t_range: TimeRange | None = None,
    trainable: Iterable[str] | None = None,
    optimizer: Mapping[str, Any] | None = None,
    ema: EMAModel | None = None,
    dp: SampleLevelDP | None = None,
    progress: bool = False,
    desc: str = "local training",
) -> TrainResult:
    """E epochs of Adam on the ε-loss over uint8 ``images``.

    ``trainable`` names the parameters to update (all by default); ``max_steps`` > 0 caps
    the optimizer steps, for quick runs. ``optimizer``: a saved Stepper state to continue
    (a fresh Adam without it); the result carries the state after. ``ema`` is stepped after
    every optimizer step. ``dp``: DP-SGD (``fedapp.privacy.dpsgd``) over the trained parameters.
    """
    if len(images) == 0:
        raise ValueError("cannot train on an empty partition")
    model.to(device).train()
    named = dict(model.named_parameters())
    keep = set(named) if trainable is None else set(trainable)
    unknown = sorted(keep - set(named))
    if unknown or not keep:
        raise ValueError(f"trainable names no model parameters: {unknown[:3] or 'empty list'}")
    try:
        for name, param in named.items():
            param.requires_grad_(name in keep)
        stepper = Stepper({n: p for n, p in named.items() if n in keep}, recipe, optimizer, dp, device)
        if ema is not None:
            ema.to(device)
        if dp is None:
            return _epochs(model, diffusion, images, stepper, ema, epochs, batch_size, seed, device, max_steps,
                           t_range, progress, desc)
        with dp.per_sample_gradients(model) as wrapped:
            return _epochs(wrapped, diffusion, images, stepper, ema, epochs, batch_size, seed, device, max_steps,
                           t_range, progress, desc, dp)
    finally:
        for param in named.values():
            param.requires_grad_(True)


def _epochs(
    model: nn.Module,
    diffusion: Diffusion,
    images: torch.Tensor,
    stepper: Stepper,
    ema: EMAModel | None,
    epochs: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    max_steps: int,
    t_range: TimeRange | None,
    progress: bool,
    desc: str,
    dp: SampleLevelDP | None = None,
) -> TrainResult:
    order_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator(device=device).manual_seed(seed + 1)
    source = images.to(device)  # the uint8 partition is small: on a GPU it goes over once, not per batch
    tally = Tally(device)
    for pick, done in shuffled_batches(len(images), batch_size, epochs, order_gen, device, max_batches=max_steps,
                                       progress=progress, desc=desc, dp=dp):
        x0 = to_model_range(source[pick])
        loss = diffusion.loss(model, x0, t_range, noise_gen) if len(pick) else None
        stepper.step(loss, done)
        if ema is not None:
            ema.step(model.parameters())
        tally.add(loss, len(x0))
    return tally.result(stepper)


@torch.no_grad()
def denoising_loss(
    model: nn.Module,
    diffusion: Diffusion,
    images: torch.Tensor,
    *,
    batch_size: int,
    seed: int,
    device: torch.device,
    t_range: TimeRange | None = None,
) -> float:
    """Mean ε-loss with a fixed seed, so successive rounds are compared on the same t and ε."""
    if len(images) == 0:
        raise ValueError("no held-out examples to evaluate on (data.val-fraction is 0?)")
    was_training = model.training
    model.to(device).eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    total = 0.0
    try:
        for first in range(0, len(images), batch_size):
            x0 = to_model_range(images[first : first + batch_size]).to(device)
            total += diffusion.loss(model, x0, t_range, gen, weighted=False).item() * len(x0)
    finally:
        model.train(was_training)
    return total / len(images)
