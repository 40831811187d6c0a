"""Local DDPM training and the held-out denoising loss, as plain PyTorch loops."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

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
    # The uint8 partition is small: on a GPU it goes over once, not once per batch. The loss
    # is summed on the device, so the host never waits for a step to finish.
    source = images.to(device)
    total = torch.zeros((), device=device)
    steps, seen = 0, 0
    start = time.perf_counter()
    for _ in tqdm(range(epochs), desc=desc, disable=not progress, leave=False):
        order = torch.randperm(len(images), generator=order_gen).to(device)
        for first in range(0, len(images), batch_size):
            x0 = to_model_range(source[order[first : first + batch_size]])
            loss = diffusion.loss(model, x0, t_range, noise_gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(x0)
            seen += len(x0)
            steps += 1
            if max_steps and steps >= max_steps:
                break
        if max_steps and steps >= max_steps:
            break
    mean = total.item() / seen  # waits for the last step, so the time below is the real one
    return TrainResult(loss=mean, steps=steps, images=seen, seconds=time.perf_counter() - start)


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
