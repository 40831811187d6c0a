"""Sample-level DP-SGD in a client's local training, with Opacus: Poisson batches, per-image clipping, noise.

Client-level DP (``mechanism``) hides whether a client took part; DP-SGD hides whether any one image
was in a client's data, from everyone who sees what the client's training produced (the server, the
other clients, the final models), and needs no trust in the server. Each step:

- the batch is Poisson-sampled: every image of the partition is in it with probability
  ``sample_rate`` = batch size / partition size (Opacus's ``UniformWithReplacementSampler``), which
  the accountant's subsampling amplification assumes; an empty batch still takes a step of noise;
- Opacus's ``GradSampleModule`` computes each image's gradient, ``DPOptimizer`` clips it to
  ``clip`` in L2 norm over every trained parameter, sums, adds N(0, (σ·clip)²) and divides by the
  expected batch size, and the trainer's Adam (warm-up, lr decay, persisted moments) steps on that.

The recipe's global gradient clip (``train.grad-clip``) does nothing here: the per-image clip
replaces it. Opacus handles every layer of our UNet (convolutions, linears, group norms, the
attention's linears); ``tests/test_dpsgd.py`` checks its per-image gradients against ones taken one
image at a time. The noise comes from a generator seeded with the operating system's entropy; the
batches from the run's seed (they reveal nothing without the data).

Each client accounts its own steps (``fedapp.privacy.accounting``): ``steps`` releases a round at
``sample_rate``. Being sampled into a round is not counted as amplification, so ε is an upper bound.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedapp.config import FedConfig
from fedapp.privacy.accounting import PrivacyAccount, load_opacus, noise_for_epsilon
from fedapp.privacy.mechanism import noise_generator


def batches_per_call(n: int, batch_size: int, epochs: int, max_batches: int = 0) -> int:
    """Optimizer steps of one training call: ``epochs`` passes of ``n`` items at ``batch_size``, capped
    at ``max_batches`` (0: no cap). Shuffled and Poisson batches take the same number (``fedapp.train.loop``
    deals them; it is here so that the loop depends on this module, not the other way round)."""
    total = epochs * -(-n // batch_size)
    return min(total, max_batches) if max_batches else total


@dataclass(frozen=True)
class SampleLevelDP:
    """DP-SGD's settings for one client's partition."""

    clip: float  # the per-image gradient's L2 bound
    noise_multiplier: float  # σ; 0: clipping only, nothing accounted
    sample_rate: float  # an image's chance to be in a step's batch
    expected_batch: int  # sample_rate × partition size: the divisor of the noisy sum

    @classmethod
    def for_partition(cls, cfg: FedConfig, images: int) -> SampleLevelDP | None:
        """The settings for a partition of ``images`` (None without ``privacy.sample-clip``).

        ``privacy.sample-target-epsilon`` picks the σ that spends it over the run's steps on this
        partition: ``train.rounds`` rounds of :func:`batches_per_call` steps.
        """
        pv, tr = cfg.privacy, cfg.train
        if not pv.sample_level:
            return None
        if images <= 0:
            raise ValueError("DP-SGD needs a partition with images")
        batch = min(tr.batch_size, images)
        rate = batch / images
        sigma = pv.sample_noise_multiplier
        if pv.sample_target_epsilon:
            steps = tr.rounds * batches_per_call(images, batch, tr.local_epochs, tr.max_steps_per_round)
            sigma = noise_for_epsilon(pv.sample_target_epsilon, pv.delta, rate, steps)
        return cls(clip=pv.sample_clip, noise_multiplier=sigma, sample_rate=rate, expected_batch=batch)

    def optimizer(self, inner: torch.optim.Optimizer, device: torch.device) -> torch.optim.Optimizer:
        """Opacus's ``DPOptimizer`` around ``inner``: it clips, sums and noises the per-image gradients."""
        return load_opacus().optimizers.DPOptimizer(
            inner, noise_multiplier=self.noise_multiplier, max_grad_norm=self.clip,
            expected_batch_size=self.expected_batch, loss_reduction="mean", generator=noise_generator(device))

    def batches(self, n: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """``steps`` Poisson batches of indices into ``n`` items (some may be empty)."""
        sampler = load_opacus().utils.uniform_sampler.UniformWithReplacementSampler(
            num_samples=n, sample_rate=self.sample_rate, generator=generator, steps=steps)
        for indices in sampler:
            yield torch.as_tensor(indices, dtype=torch.long)

    @staticmethod
    @contextmanager
    def per_sample_gradients(model: nn.Module) -> Iterator[nn.Module]:
        """``model`` wrapped in Opacus's ``GradSampleModule`` (each trained parameter gets ``grad_sample``
        after a backward pass); the hooks and attributes are removed again on exit."""
        wrapped: Any = load_opacus().GradSampleModule(model, batch_first=True, loss_reduction="mean")
        try:
            with warnings.catch_warnings():  # Opacus's hooks on the first layer, whose input needs no gradient
                warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
                yield wrapped
        finally:
            wrapped._close()

    @staticmethod
    def empty_batch(params: list[nn.Parameter]) -> None:
        """What a backward pass over an empty batch would leave: no per-image gradients, so the step is noise."""
        for param in params:
            param.grad_sample = torch.zeros((0, *param.shape), device=param.device, dtype=param.dtype)

    def account(self, account: PrivacyAccount, steps: int) -> None:
        """Record ``steps`` more DP-SGD steps in ``account`` (nothing without noise)."""
        if self.noise_multiplier and steps:
            account.release(self.noise_multiplier, self.sample_rate, steps)
