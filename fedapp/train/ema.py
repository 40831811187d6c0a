"""The exponential moving average of the weights that samples and evaluations use.

diffusers' ``EMAModel`` does the averaging and its warm-up (decay = 1 - (1 + step) ** -power,
capped at ``train.ema-decay``), so a short run is not an average dominated by its random start.
Where the EMA lives depends on who holds the trained model:

* a model trained by steps in one place (the centralized baseline, the personal models of
  ULatDec and UDec, CollaFuse's client models and its server's shared model) has an EMA over
  every optimizer step, kept where the model is (in the run's checkpoint, or on the node's disk
  beside the private parts);
* a global model (Full, USplit) is known to the server only once a round, so the server keeps
  its EMA, one update a round: :class:`fedapp.train.round_ema.RoundEMA` raises the per-step
  decay to the round's mean local steps, so one round of k steps counts as k steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedapp.config import TrainConfig

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel


def make_ema(model: nn.Module, cfg: TrainConfig, state: Mapping[str, Any] | None = None) -> EMAModel | None:
    """An EMA of ``model``'s parameters (None when ``train.ema-decay`` is 0), restored from ``state``."""
    if not cfg.ema_decay:
        return None
    # imported here: diffusers.training_utils loads diffusers' models (about 1 s), which a ClientApp
    # process whose EMA lives on the server (Full, USplit) never needs
    from diffusers.training_utils import EMAModel

    ema = EMAModel(model.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=cfg.ema_power)
    if state is not None:
        load_ema(ema, model, state)
    return ema


def ema_state(ema: EMAModel, model: nn.Module) -> dict[str, Any]:
    """What to save: the averaged weights by name (a state dict ``build_model`` loads) and the step count."""
    return {"weights": ema_weights(ema, model), "steps": ema.optimization_step}


def load_ema(ema: EMAModel, model: nn.Module, state: Mapping[str, Any]) -> None:
    weights = state["weights"]
    names = [name for name, _ in model.named_parameters()]
    missing = [name for name in names if name not in weights]
    if missing:
        raise ValueError(f"saved EMA lacks {len(missing)} of the model's parameters, e.g. {missing[0]!r}")
    ema.load_state_dict({**ema.state_dict(), "optimization_step": int(state["steps"]),
                         "shadow_params": [weights[name].detach().clone().float() for name in names]})


def ema_weights(ema: EMAModel, model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict with its parameters replaced by their averages (buffers as they are)."""
    shadows = dict(zip((name for name, _ in model.named_parameters()), ema.shadow_params, strict=True))
    return {key: shadows.get(key, value).detach().cpu().clone() for key, value in model.state_dict().items()}
