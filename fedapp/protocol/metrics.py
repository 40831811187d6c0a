"""How clients' metric replies combine into one row."""

from __future__ import annotations

import statistics

from flwr.app import MetricRecord, RecordDict

from fedapp.protocol.keys import IDENTIFIERS

# Keys clients report to identify themselves: not metrics, never averaged.


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
