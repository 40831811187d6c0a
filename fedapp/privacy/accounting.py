"""ε at δ after each private release, from Opacus's RDP accountant.

A release is one round's noisy mean of clipped client updates.
The accountant assumes each release samples every record independently with probability
``sample_rate`` (Poisson sampling): a client with probability ``strategy.fraction-train`` per
round at client level with the server's noise (Flower samples a fixed number of nodes; with
fraction 1 the two agree), 1 when each client noises its own update (what the server sees of a
client is that client's release every round it takes part), and batch / partition size per DP-SGD
step. The history is a plain list, so a resumed run continues the same account.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from fedapp.config import FedConfig


@cache
def load_opacus() -> Any:
    """``opacus`` with the parts we use, imported on first use. Importing opacus calls ``logging.basicConfig``
    (``opacus.utils.module_utils``), and the root handler it adds would print every log line of the
    process a second time; it is removed again, and a run without privacy never imports opacus."""
    root = logging.getLogger()
    before = list(root.handlers)
    import opacus
    import opacus.accountants
    import opacus.accountants.utils
    import opacus.optimizers
    import opacus.utils.uniform_sampler

    for handler in root.handlers[:]:
        if handler not in before:
            root.removeHandler(handler)
    return opacus


@dataclass
class PrivacyAccount:
    """The releases so far (``history``: Opacus's ``(noise multiplier, sample rate, count)`` triples)."""

    delta: float
    history: list[tuple[float, float, int]] = field(default_factory=list)

    def release(self, noise_multiplier: float, sample_rate: float, count: int = 1) -> None:
        """Record ``count`` releases of a Gaussian mechanism with this multiplier and sampling rate."""
        if noise_multiplier <= 0 or not 0 < sample_rate <= 1 or count < 0:
            raise ValueError(f"a release needs noise multiplier > 0 and sample rate in (0, 1]; "
                             f"got {noise_multiplier}, {sample_rate}")
        accountant = self._accountant()
        for _ in range(count):  # Opacus merges a run of equal releases into one (σ, q, count) entry
            accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
        self.history = list(accountant.history)

    @property
    def releases(self) -> int:
        return sum(count for *_, count in self.history)

    def epsilon(self) -> float:
        """ε at ``delta`` after every release so far (0 before the first)."""
        return float(self._accountant().get_epsilon(self.delta)) if self.history else 0.0

    def _accountant(self) -> Any:
        """Opacus's RDP accountant holding this account's releases."""
        accountant = load_opacus().accountants.RDPAccountant()
        accountant.history = list(self.history)
        return accountant

    def state(self) -> dict[str, object]:
        return {"delta": self.delta, "history": [list(entry) for entry in self.history]}

    @classmethod
    def from_state(cls, state: dict[str, object]) -> PrivacyAccount:
        history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]  # type: ignore[attr-defined]
        return cls(delta=float(state["delta"]), history=history)  # type: ignore[arg-type]


@cache  # a client adding its own noise derives it every round; the search takes a while
def noise_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, releases: int) -> float:
    """The noise multiplier after which ``releases`` releases at ``sample_rate`` spend ``target_epsilon``."""
    get_noise_multiplier = load_opacus().accountants.utils.get_noise_multiplier
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=releases, accountant="rdp"))


def client_level_release(cfg: FedConfig) -> tuple[float, float]:
    """(noise multiplier, sample rate) of each round's client-level release; both ends derive the same.

    ``privacy.target-epsilon`` chooses the multiplier that spends it over ``train.rounds`` releases.
    """
    pv = cfg.privacy
    rate = cfg.strategy.fraction_train if pv.noise == "server" else 1.0
    if pv.target_epsilon:
        return noise_for_epsilon(pv.target_epsilon, pv.delta, rate, cfg.train.rounds), rate
    return pv.noise_multiplier, rate
