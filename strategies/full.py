"""FedDiffuse's "Full" method: FedAvg over every UNet parameter."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg


class Full(FedAvg):
    """Example-weighted FedAvg of the whole model (``num-examples`` weights).

    The baseline whose communication the sub-block methods cut down; it needs nothing
    beyond FedAvg, and exists so every method is selected and built the same way.
    """

    method = "full"
