"""How clients' metric replies combine into one row."""

from __future__ import annotations

import statistics

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedapp.protocol.keys import IDENTIFIERS, WORST_CASE


def weighted_mean_over_clients(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Flower's example-weighted mean of each metric (a shared model's), less the keys that say who
    replied: an averaged partition id means nothing, and Flower logs what this returns. A guarantee
    (``WORST_CASE``: each client's DP-SGD ε) is the largest over clients, since a mean promises nobody."""
    mean = aggregate_metricrecords(records, weighted_by_key)
    out = MetricRecord({key: value for key, value in mean.items() if key not in IDENTIFIERS})
    for key in WORST_CASE:
        values = [float(m[key]) for r in records for m in r.metric_records.values()  # type: ignore[arg-type]
                  if isinstance(m.get(key), int | float)]
        if values:
            out[key] = max(values)
    return out


def mean_std_over_clients(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Unweighted mean and standard deviation of each metric over clients (personal models)."""
    skip = {weighted_by_key, *IDENTIFIERS}
    values: dict[str, list[float]] = {}
    for record in records:
        for metrics in record.metric_records.values():
            for key, value in metrics.items():
                if key not in skip and isinstance(value, int | float):
                    values.setdefault(key, []).append(float(value))
    out: dict[str, float] = {}
    for key, vals in values.items():
        out[key] = statistics.fmean(vals)
        out[f"{key}-std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
    out["clients"] = float(len(records))
    return MetricRecord(out)
