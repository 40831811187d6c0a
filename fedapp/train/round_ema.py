"""The server's EMA of a global model (Full, USplit), one update a round.

Apart from :mod:`fedapp.train.ema` because it subclasses diffusers' ``EMAModel`` at import time, and
only the server needs it: a ClientApp process imports the client side without diffusers' models.
"""

from __future__ import annotations

from diffusers.training_utils import EMAModel
from torch import nn

from fedapp.config import TrainConfig


class RoundEMA(EMAModel):
    """The server's EMA of a global model: one update a round, worth that round's local steps.

    ``EMAModel`` counts one step per update; here the count and the warm-up follow the clients'
    optimizer steps, and the decay of one update is the per-step decay to the power of the steps.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig) -> None:
        super().__init__(model.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=cfg.ema_power)
        self.round_steps = 1

    def update(self, model: nn.Module, local_steps: int) -> None:
        """Average in ``model`` after a round in which each client took ``local_steps`` steps."""
        self.round_steps = max(int(local_steps), 1)
        self.step(model.parameters())
        self.optimization_step += self.round_steps - 1  # step() counted one

    def get_decay(self, optimization_step: int) -> float:
        # step() has added 1 to the count; the round's steps run from there
        per_step = super().get_decay(optimization_step + self.round_steps - 1)
        return per_step ** self.round_steps
