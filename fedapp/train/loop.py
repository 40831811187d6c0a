"""Local DDPM training and the held-out denoising loss, as plain PyTorch loops.

One epoch loop serves every trainer: :func:`shuffled_batches` deals the index batches of
E shuffled passes, :class:`Tally` sums the loss on the device and times the work, and
:func:`optimizer_step` takes one step. Local training (FedDiffuse and the centralized
baseline) and both halves of CollaFuse (``fedapp.train.collafuse``) are built from them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from fedapp.data.pixels import to_model_range
from fedapp.model.diffusion import Diffusion, TimeRange


@dataclass(frozen=True)
class TrainResult:
    loss: float
    steps: int
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def shuffled_batches(n: int, batch_size: int, epochs: int, generator: torch.Generator, device: torch.device, *,
                     progress: bool = False, desc: str = "") -> Iterator[torch.Tensor]:
    """Index batches of ``epochs`` passes over ``n`` items, each pass in a fresh order from ``generator``."""
    for _ in tqdm(range(epochs), desc=desc, disable=not progress, leave=False):
        order = torch.randperm(n, generator=generator).to(device)
        for first in range(0, n, batch_size):
            yield order[first : first + batch_size]


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


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

    def add(self, loss: torch.Tensor, count: int) -> None:
        self.total += loss.detach() * count
        self.seen += count
        self.steps += 1

    def result(self) -> TrainResult:
        mean = self.total.item() / self.seen if self.seen else 0.0  # waits for the last step
        return TrainResult(loss=mean, steps=self.steps, images=self.seen, seconds=time.perf_counter() - self.start)


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
    lr: float,
    seed: int,
    device: torch.device,
    max_steps: int = 0,
    t_range: TimeRange | None = None,
    trainable: Iterable[str] | None = None,
    progress: bool = False,
    desc: str = "local training",
) -> TrainResult:
    """E epochs of Adam on the ε-loss over uint8 ``images``; a fresh optimizer per call.

    ``trainable`` names the parameters to update (all by default); ``max_steps`` > 0 caps
    the optimizer steps, for quick runs.
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
        return _epochs(model, diffusion, images, [p for n, p in named.items() if n in keep],
                       epochs, batch_size, lr, seed, device, max_steps, t_range, progress, desc)
    finally:
        for param in named.values():
            param.requires_grad_(True)


def _epochs(
    model: nn.Module,
    diffusion: Diffusion,
    images: torch.Tensor,
    params: list[nn.Parameter],
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
    max_steps: int,
    t_range: TimeRange | None,
    progress: bool,
    desc: str,
) -> TrainResult:
    optimizer = torch.optim.Adam(params, lr=lr)
    order_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator(device=device).manual_seed(seed + 1)
    source = images.to(device)  # the uint8 partition is small: on a GPU it goes over once, not per batch
    tally = Tally(device)
    for pick in shuffled_batches(len(images), batch_size, epochs, order_gen, device, progress=progress, desc=desc):
        x0 = to_model_range(source[pick])
        loss = diffusion.loss(model, x0, t_range, noise_gen)
        optimizer_step(optimizer, loss)
        tally.add(loss, len(x0))
        if max_steps and tally.steps >= max_steps:
            break
    return tally.result()


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
            total += diffusion.loss(model, x0, t_range, gen).item() * len(x0)
    finally:
        model.train(was_training)
    return total / len(images)
