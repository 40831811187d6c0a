"""Server-side aggregation methods, selected by ``strategy.name``."""

from __future__ import annotations

from fedapp.config import FedConfig
from strategies.base import FedappStrategy
from strategies.collafuse import CollaFuse
from strategies.full import Full
from strategies.partial import PartFedAvg, UDec, ULatDec, USplit
from strategies.privacy import ClientLevelDP

STRATEGIES: dict[str, type[FedappStrategy]] = {"full": Full, "usplit": USplit, "ulatdec": ULatDec, "udec": UDec}


def build_strategy(cfg: FedConfig) -> FedappStrategy:
    s = cfg.strategy
    sampling: dict[str, object] = {
        "fraction_train": s.fraction_train,
        "fraction_evaluate": s.fraction_evaluate,
        "min_train_nodes": s.min_nodes,
        "min_evaluate_nodes": s.min_nodes if s.fraction_evaluate > 0 else 0,
        "min_available_nodes": s.min_nodes,
    }
    if s.name == "collafuse":
        return CollaFuse(cfg, **sampling)
    sampling.update(max_num_examples=s.max_num_examples, min_valid_replies=s.min_valid_replies,
                    aggregation=s.aggregation, trim_fraction=s.trim_fraction, privacy=ClientLevelDP.from_config(cfg))
    if s.name == "usplit":
        sampling["seed"] = cfg.seed
    return STRATEGIES[s.name](**sampling)


__all__ = ["STRATEGIES", "CollaFuse", "FedappStrategy", "Full", "PartFedAvg", "UDec", "ULatDec", "USplit", "build_strategy"]
