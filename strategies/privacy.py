"""Client-level differential privacy on the server: clip each valid reply's update, noise each part's mean.

The strategy calls three hooks (``fedapp.privacy.mechanism`` holds why not Flower's wrappers):
:meth:`ClientLevelDP.clip_replies` on the replies that passed the checks, :meth:`ClientLevelDP.noised`
on each averaged part with the number of replies behind it, :meth:`ClientLevelDP.released` on the
round's metrics, which then carry ``dp-epsilon``. The mean is unweighted (``unweighted-mean``): a
client's example count is its own claim, and a weighted mean's sensitivity is not ``clip / m``.

With the server's noise (``privacy.noise = "server"``) the server clips every update again, so a
client that did not clip cannot raise the sensitivity. With each client's own noise the updates it
receives are noised already, their norm far above the clip, and it adds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO

from flwr.app import Array, ArrayRecord, Message, MetricRecord

from fedapp.config import FedConfig
from fedapp.log import log
from fedapp.privacy.accounting import PrivacyAccount, client_level_release
from fedapp.privacy.mechanism import add_noise, clip_update
from fedapp.protocol.keys import DP_EPSILON
from fedapp.protocol.records import decode_array, encode_tensor


@dataclass
class ClientLevelDP:
    clip: float
    noise_multiplier: float  # 0: clipping only, nothing accounted
    by_server: bool  # the server adds the noise (else each client did)
    sample_rate: float  # the accountant's per-round chance that a client's update is in the release
    account: PrivacyAccount

    @classmethod
    def from_config(cls, cfg: FedConfig) -> ClientLevelDP | None:
        pv = cfg.privacy
        if not pv.client_level:
            return None
        sigma, rate = client_level_release(cfg)
        if pv.target_epsilon:
            log(INFO, "privacy: noise multiplier %.4f spends ε = %g at δ = %g over %d rounds (sample rate %g)",
                sigma, pv.target_epsilon, pv.delta, cfg.train.rounds, rate)
        return cls(pv.clip, sigma, pv.noise == "server", rate, PrivacyAccount(pv.delta))

    def clip_replies(self, replies: list[Message], sent: ArrayRecord, key: str) -> None:
        """Clip each reply's arrays (decoded, float32) to ``clip`` from what the server sent, in place."""
        if not self.by_server:
            return
        for reply in replies:
            arrays = reply.content[key]
            new = {k: decode_array(arrays[k]) for k in arrays.keys()}
            clipped, _ = clip_update(new, {k: decode_array(sent[k]) for k in new}, self.clip)
            reply.content[key] = ArrayRecord({k: encode_tensor(v) for k, v in clipped.items()})

    def noised(self, arrays: ArrayRecord | dict[str, Array], contributors: int) -> dict[str, Array]:
        """A mean of ``contributors`` clipped updates with the server's noise, N(0, (σ·clip/m)²), added."""
        items = dict(arrays.items())
        if not (self.by_server and self.noise_multiplier and contributors):
            return items
        std = self.noise_multiplier * self.clip / contributors
        noisy = add_noise({k: decode_array(v) for k, v in items.items()}, std)
        return {k: encode_tensor(v) for k, v in noisy.items()}

    def released(self, metrics: MetricRecord | None) -> MetricRecord:
        """Account the round's release; the metrics with ε at δ so far."""
        out = MetricRecord(dict(metrics or {}))
        if self.noise_multiplier:
            self.account.release(self.noise_multiplier, self.sample_rate)
            out[DP_EPSILON] = self.account.epsilon()
        return out
