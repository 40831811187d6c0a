"""Noise schedule, training loss and the reverse chain, in one place.

The β schedule and every sampler step come from diffusers' schedulers; this module only
decides which timesteps run. Sampling runs any contiguous stretch of the reverse chain,
so one model can stop at x_t and another can finish from it (CollaFuse's split).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils import logging as diffusers_logging
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from fedapp.config import DiffusionConfig

diffusers_logging.set_verbosity_error()

Sampler = Literal["ddpm", "ddim"]
TimeRange = tuple[int, int]


class Diffusion:
    """A DDPM: forward noising for training, DDPM or DDIM steps for sampling."""

    def __init__(
        self,
        timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        loss: Literal["huber", "mse"] = "huber",
        clip_sample: bool = False,
        min_snr_gamma: float = 0.0,
    ) -> None:
        self.timesteps = timesteps
        self.loss_kind = loss
        self.min_snr_gamma = min_snr_gamma
        self.scheduler = DDPMScheduler(
            num_train_timesteps=timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule="linear",
            prediction_type="epsilon",
            variance_type="fixed_small",
            clip_sample=clip_sample,
        )
        self._loss_fn: Callable[..., torch.Tensor] = F.smooth_l1_loss if loss == "huber" else F.mse_loss

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> Diffusion:
        return cls(cfg.timesteps, cfg.beta_start, cfg.beta_end, cfg.loss, cfg.clip_sample, cfg.min_snr_gamma)

    # ----------------------------------------------------------------------------- training
    def check_range(self, t_range: TimeRange | None) -> TimeRange:
        lo, hi = t_range if t_range is not None else (0, self.timesteps)
        if not 0 <= lo < hi <= self.timesteps:
            raise ValueError(f"timestep range [{lo}, {hi}) is empty or outside [0, {self.timesteps})")
        return lo, hi

    def noised(
        self,
        x0: torch.Tensor,
        t_range: TimeRange | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, ε) with t ~ U{lo..hi-1} and x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·ε."""
        lo, hi = self.check_range(t_range)
        t = torch.randint(lo, hi, (x0.shape[0],), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return self.scheduler.add_noise(x0, noise, t), t, noise

    def loss(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        t_range: TimeRange | None = None,
        generator: torch.Generator | None = None,
        weighted: bool = True,
    ) -> torch.Tensor:
        """The ε-prediction loss on timesteps drawn from ``t_range`` = [lo, hi) (all by default).

        ``weighted=False`` drops the Min-SNR weights: held-out losses stay comparable across recipes.
        """
        x_t, t, noise = self.noised(x0, t_range, generator)
        return self.loss_on(model, x_t, t, noise, weighted)

    def loss_on(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor,
                weighted: bool = True) -> torch.Tensor:
        """The ε-prediction loss on given triples: CollaFuse's server trains on what it received."""
        prediction = model(x_t, t)
        if not (weighted and self.min_snr_gamma):
            return self.criterion(prediction, target)
        per_image = self._loss_fn(prediction, target, reduction="none").flatten(1).mean(1)
        return (per_image * self.snr_weights(t)).mean()

    def snr_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-γ weights of ε-prediction, min(SNR(t), γ) / SNR(t), with diffusers' SNR."""
        from diffusers.training_utils import compute_snr  # training only: not on a sampling path

        snr = compute_snr(self.scheduler, t.long())
        return snr.clamp(max=self.min_snr_gamma) / snr

    def criterion(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The configured loss (Huber or MSE, mean over all elements) between ε̂ and ε."""
        return self._loss_fn(prediction, target)

    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t - √(1-ᾱ_t)·ε) / √ᾱ_t: whoever holds x_t, t and ε (or a guess of ε) can solve for x0."""
        abar = self.scheduler.alphas_cumprod.to(device=x_t.device, dtype=x_t.dtype)[t.long()]
        abar = abar.view(-1, *([1] * (x_t.dim() - 1)))
        return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()

    # ----------------------------------------------------------------------------- sampling
    def sampler(self, kind: Sampler = "ddim", steps: int | None = None) -> DDPMScheduler | DDIMScheduler:
        """A fresh scheduler with its timestep grid set (trailing DDIM grid starts at T-1)."""
        steps = self.timesteps if steps is None else steps
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"sampler steps must be in [1, {self.timesteps}], got {steps}")
        if kind == "ddim" and self.timesteps % steps:
            # diffusers steps DDIM from t to t - T//steps, which is off the grid otherwise
            raise ValueError(f"DDIM steps must divide T = {self.timesteps}; got {steps}")
        if kind == "ddpm":
            sched: DDPMScheduler | DDIMScheduler = DDPMScheduler.from_config(self.scheduler.config)
        elif kind == "ddim":
            sched = DDIMScheduler.from_config(
                self.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True
            )
        else:
            raise ValueError(f"unknown sampler {kind!r}; use 'ddpm' or 'ddim'")
        sched.set_timesteps(steps)
        return sched

    def grid(self, kind: Sampler = "ddim", steps: int | None = None, t_start: int | None = None,
             t_stop: int = 0) -> list[int]:
        """The timesteps a stretch [t_stop, t_start) runs, in the order it runs them."""
        t_start = self.timesteps if t_start is None else t_start
        if not 0 <= t_stop <= t_start <= self.timesteps:
            raise ValueError(f"invalid stretch: need 0 <= t_stop ({t_stop}) <= t_start ({t_start}) <= {self.timesteps}")
        sched = self.sampler(kind, steps)
        return [int(t) for t in sched.timesteps if t_stop <= int(t) < t_start]

    def prior(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
              device: torch.device | str = "cpu") -> torch.Tensor:
        """x_T ~ N(0, I)."""
        return torch.randn(shape, generator=generator, device=device)

    @torch.no_grad()
    def sample(
        self,
        model: nn.Module,
        x: torch.Tensor,
        t_start: int | None = None,
        t_stop: int = 0,
        kind: Sampler = "ddim",
        steps: int | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        eta: float = 0.0,
    ) -> torch.Tensor:
        """Run the reverse chain over the grid timesteps t with t_stop <= t < t_start.

        ``x`` is the state entering the first of those steps (pure noise when
        t_start = T). The result enters the next grid step below t_stop, or is the
        final sample when t_stop = 0. Two stretches that meet at the same cut, on the
        same grid, compose to the full chain. ``eta`` is DDIM's noise (0: deterministic,
        1: ancestral on the DDIM grid); DDPM ignores it.
        """
        t_start = self.timesteps if t_start is None else t_start
        if not 0 <= t_stop <= t_start <= self.timesteps:
            raise ValueError(f"invalid stretch: need 0 <= t_stop ({t_stop}) <= t_start ({t_start}) <= {self.timesteps}")
        sched = self.sampler(kind, steps)
        todo = [t for t in sched.timesteps if t_stop <= int(t) < t_start]
        extra = {"eta": eta} if kind == "ddim" else {}  # DDPMScheduler.step takes no eta
        was_training = model.training
        model.eval()
        try:
            bar = tqdm(todo, desc=f"{kind} sampling", unit="step", disable=not progress, leave=False)
            for done, t in enumerate(bar, start=1):
                t_batch = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
                eps = model(x, t_batch)
                x = sched.step(eps, int(t), x, generator=generator, **extra).prev_sample
                if progress:  # images finished per second, had the batch stopped here
                    rate = x.shape[0] * done / len(todo) / max(bar.format_dict["elapsed"], 1e-9)
                    bar.set_postfix_str(f"{rate:.1f} img/s", refresh=False)
        finally:
            model.train(was_training)
        return x
