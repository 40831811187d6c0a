"""Every trainer's optimizer: Adam with a linear learning-rate warm-up, a cosine decay and gradient clipping.

One :class:`Stepper` serves local training, both halves of CollaFuse and the centralized
baseline. Its state (Adam's moments and the step count the warm-up reads) is a plain dict, so a
client can keep it on its node's disk between rounds (``train.optimizer-state = "persist"``) and
a resumed run continues exactly where the lost one stood.

The decay follows the run, not the optimizer: a trainer's call covers a share of the run's
training (round r of R covers (r-1)/R to r/R), and within the call the lr falls with the share
of its batches done. So a fresh Adam per round, a persisted one, CollaFuse's two halves and the
centralized baseline all end the run at ``lr * final_lr_ratio`` without counting each other's steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedapp.config import TrainConfig

if TYPE_CHECKING:
    from fedapp.privacy.dpsgd import SampleLevelDP


@dataclass(frozen=True)
class Recipe:
    """How a trainer steps; the defaults are plain Adam, the paper's."""

    lr: float
    warmup_steps: int = 0
    grad_clip: float = 0.0
    final_lr_ratio: float = 1.0  # the lr at the run's end over ``lr``, reached along a half cosine; 1: flat
    span: tuple[float, float] = (0.0, 1.0)  # the share of the run's training this trainer's call covers

    @classmethod
    def from_config(cls, cfg: TrainConfig, server_round: int = 1) -> Recipe:
        """The recipe of round ``server_round`` (1-based) of ``cfg.rounds``."""
        if not 1 <= server_round <= cfg.rounds:
            raise ValueError(f"server round {server_round} is outside 1..{cfg.rounds} (train.rounds)")
        return cls(lr=cfg.lr, warmup_steps=cfg.warmup_steps, grad_clip=cfg.grad_clip,
                   final_lr_ratio=cfg.final_lr_ratio,
                   span=((server_round - 1) / cfg.rounds, server_round / cfg.rounds))

    def lr_at(self, step: int, done: float = 0.0) -> float:
        """The lr of optimizer step ``step`` (0-based, the warm-up's count) when ``done`` of the call's batches are.

        A linear rise over ``warmup_steps``, times the cosine from 1 to ``final_lr_ratio`` at the
        run's progress ``span[0] + done * (span[1] - span[0])``.
        """
        start, stop = self.span
        progress = min(max(start + done * (stop - start), 0.0), 1.0)
        lr = self.lr * (self.final_lr_ratio + (1 - self.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
        if self.warmup_steps and step < self.warmup_steps:
            return lr * (step + 1) / self.warmup_steps
        return lr


class Stepper:
    """An Adam over named parameters that warms up, clips, counts its steps and can be saved and restored.

    The saved state keys Adam's moments by parameter name, so it fits a later call that trains a
    different subset (USplit's per-round parts with ``train.scope = "shared"``): moments of names
    not trained now are carried along unchanged, and names never seen start fresh.

    With ``dp`` (DP-SGD, ``fedapp.privacy.dpsgd``) Opacus's ``DPOptimizer`` wraps the Adam: it clips
    each image's gradient and adds the noise before Adam steps, and the global clip is not applied.
    """

    def __init__(self, named: Mapping[str, nn.Parameter], recipe: Recipe,
                 state: Mapping[str, Any] | None = None, dp: SampleLevelDP | None = None,
                 device: torch.device | None = None) -> None:
        self.names, self.params, self.recipe = list(named), list(named.values()), recipe
        adam = torch.optim.Adam(self.params, lr=recipe.lr)
        self.dp = dp
        self.optimizer = dp.optimizer(adam, device or torch.device("cpu")) if dp is not None else adam
        self.steps = 0
        self.carried: dict[str, Any] = {}
        if state is not None:
            self.load_state_dict(state)

    def step(self, loss: torch.Tensor | None, done: float = 0.0) -> None:
        """One optimizer step on ``loss``; ``done``: the share of this call's batches already taken.

        ``loss`` None: an empty Poisson batch under DP-SGD, whose step is the noise alone.
        """
        lr = self.recipe.lr_at(self.steps, done)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        if loss is not None:
            loss.backward()
        elif self.dp is not None:
            self.dp.empty_batch(self.params)
        else:
            raise ValueError("a step without a loss is an empty DP-SGD batch; this trainer has no DP-SGD")
        if self.recipe.grad_clip and self.dp is None:
            torch.nn.utils.clip_grad_norm_(self.params, self.recipe.grad_clip)
        self.optimizer.step()
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        """``{"steps": n, "moments": {name: Adam's state}}``, on the CPU."""
        current = self.optimizer.state_dict()["state"]
        moments = dict(self.carried)
        for index, name in enumerate(self.names):
            if index in current:
                moments[name] = {k: v.detach().cpu().clone() if torch.is_tensor(v) else v
                                 for k, v in current[index].items()}
        return {"steps": self.steps, "moments": moments}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """A state from :meth:`state_dict`; one that does not fit is a ValueError naming why."""
        try:
            moments: Mapping[str, Any] = state["moments"]
            steps = int(state["steps"])
            for name, param in zip(self.names, self.params, strict=True):
                saved = moments.get(name, {}).get("exp_avg")
                if saved is not None and saved.shape != param.shape:
                    raise ValueError(f"{name}: saved {tuple(saved.shape)}, parameter {tuple(param.shape)}")
            groups = self.optimizer.state_dict()["param_groups"]
            self.optimizer.load_state_dict({
                "state": {i: moments[name] for i, name in enumerate(self.names) if name in moments},
                "param_groups": groups,
            })
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            raise ValueError(f"saved optimizer state does not fit this model: {err}") from None
        self.steps = steps
        self.carried = {name: value for name, value in moments.items() if name not in set(self.names)}
