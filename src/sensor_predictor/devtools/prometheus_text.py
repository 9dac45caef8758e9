"""The Prometheus text exposition read back, and quantiles from histogram buckets.

    sample = parse_metrics(body)                      # {'name{labels}': value}
    value(sample, "sensor_bad_readings_total", 'reason="x"')
    histogram_quantile(0.99, bucket_delta(buckets(after, LATENCY), buckets(before, LATENCY)))

Pure functions: the demo, the tests and the bench read the worker's /metrics with them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["LATENCY", "bucket_delta", "buckets", "histogram_quantile", "parse_metrics",
           "quantile_between", "value"]

LATENCY = "sensor_prediction_latency_seconds"

Buckets = list[tuple[float, float]]  # (upper bound, cumulative count), increasing, +Inf last


def parse_metrics(text: str) -> dict[str, float]:
    """Every sample by its full series text, `name` or `name{labels}` as exposed."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, raw = line.rpartition(" ")
        try:
            out[series] = float(raw)
        except ValueError:
            continue
    return out


def value(sample: Mapping[str, float], name: str, labels: str = "") -> float | None:
    """One series: exact label text (e.g. 'reason="x"'); without labels, `name` or `name{}`."""
    if labels:
        return sample.get(f"{name}{{{labels}}}")
    return sample.get(name, sample.get(f"{name}{{}}"))


def buckets(sample: Mapping[str, float], name: str = LATENCY) -> Buckets:
    """The cumulative buckets of an unlabelled histogram `name`, +Inf last."""
    prefix = f"{name}_bucket{{"
    out = []
    for series, count in sample.items():
        if series.startswith(prefix) and 'le="' in series:
            le = series.split('le="', 1)[1].split('"', 1)[0]
            out.append((math.inf if le == "+Inf" else float(le), count))
    return sorted(out)


def bucket_delta(now: Sequence[tuple[float, float]], before: Sequence[tuple[float, float]]
                 ) -> Buckets:
    """The observations made between two readings of the same histogram."""
    earlier = dict(before)
    return [(bound, count - earlier.get(bound, 0.0)) for bound, count in now]


def histogram_quantile(q: float, cumulative: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding the rank
    (empty buckets skipped); a rank in the +Inf bucket gives the largest finite bound. None
    without observations."""
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    rank = q * cumulative[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank and count > below:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def quantile_between(q: float, before: Mapping[str, float], after: Mapping[str, float],
                     name: str = LATENCY) -> float | None:
    """The quantile of the observations of histogram `name` between two scrapes."""
    return histogram_quantile(q, bucket_delta(buckets(after, name), buckets(before, name)))
