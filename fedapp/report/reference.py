"""The FedDiffuse authors' published Fashion-MNIST numbers, kept as plain data for ``fedapp report``.

Source: FedDiffuse, M. de Goede, B. Cox, J. Decouchant, "Training Diffusion Models with Federated
Learning" (2024), Fashion-MNIST results. Their FID is the Inception FID over 1000 DDPM-1000 samples,
K=5 clients, E=5 local epochs, R=15 rounds, reported as mean ± std over the clients' models. The
communication savings are theirs too: after 15 rounds with K=10, computed from the UNet part sizes.

These numbers come from the authors' setup and are shown next to ours only as context: our FD-CNN
(features of our own Fashion-MNIST classifier) is a different distance, so the absolute values
cannot be compared.
"""

from __future__ import annotations

from typing import NamedTuple

CITATION = 'FedDiffuse (de Goede, Cox, Decouchant, 2024), "Training Diffusion Models with Federated Learning", arXiv 2406.12575'
SETUP = "Inception FID, DDPM-1000, K=5, E=5, R=15, 1000 samples"
COMM_SETUP = "after 15 rounds with K=10, from the part sizes"

PARTITIONERS: tuple[str, ...] = ("iid", "label-skew", "quantity-skew")
"""The authors' three partitions, named as ``data.partitioner`` names ours."""

CENTRALIZED_FID = 42.53


class Fid(NamedTuple):
    mean: float
    std: float


FID: dict[str, dict[str, Fid]] = {
    "udec": {
        "iid": Fid(47.90, 9.26),
        "label-skew": Fid(70.16, 28.34),
        "quantity-skew": Fid(142.30, 134.61),
    },
    "ulatdec": {
        "iid": Fid(49.19, 13.54),
        "label-skew": Fid(70.51, 34.37),
        "quantity-skew": Fid(120.75, 135.10),
    },
}
"""Method -> partitioner -> FID over the clients' models. Full and USplit are not in our reference."""

COMM_REDUCTION_VS_FULL: dict[str, float] = {"full": 0.0, "usplit": 0.25, "ulatdec": 0.41, "udec": 0.735}
"""Fraction of Full's cumulative parameters a method saves (approximate, "about")."""

METHODS: tuple[str, ...] = ("full", "usplit", "ulatdec", "udec")
