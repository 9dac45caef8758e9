"""A worker's public snapshot: what it serves and has done, read from its own metrics (so it
says what /metrics says), for whoever watches a worker in-process (the demo)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from sensor_predictor.metrics import Metrics

__all__ = ["WorkerSnapshot", "take_snapshot"]


@dataclass(frozen=True)
class WorkerSnapshot:
    """What a worker is doing, for whoever watches it in-process (the demo): read from its own
    metrics, so it says what /metrics says."""

    ready: bool
    model_version: str | None
    predictions: int  # written since the start
    bad_readings: int  # recorded as reading_errors since the start
    # The latency histogram (insert to prediction commit), cumulative: (upper bound, count),
    # +Inf last; empty before the first observation.
    latency_buckets: list[tuple[float, float]]
    drift_score: float | None  # None until the window is full
    drift_detected: bool
    drift_events: int
    backlog: int  # as the worker last counted it (every few seconds)
    metrics_port: int | None  # where /metrics and /ready answer, once they do
    # Shadow scoring: the candidate's version (None: no candidate), its readings scored, its
    # agreement windows and the last one's figures (None before the first window).
    shadow_version: str | None = None
    shadow_predictions: int = 0
    shadow_evaluations: int = 0
    shadow_ari: float | None = None
    shadow_same_id: float | None = None
    shadow_drift_score: float | None = None


def take_snapshot(metrics: Metrics, *, ready: bool, model_version: str | None,
                  metrics_port: int | None, shadow_version: str | None = None
                  ) -> WorkerSnapshot:
    m = metrics
    score = _value(m.drift_score)
    return WorkerSnapshot(
        shadow_version=shadow_version,
        shadow_predictions=int(_value(m.shadow_predictions)),
        shadow_evaluations=int(_value(m.shadow_evaluations)),
        shadow_ari=_number(m.shadow_ari),
        shadow_same_id=_number(m.shadow_same_id),
        shadow_drift_score=_number(m.shadow_drift_score),
        ready=ready,
        model_version=model_version,
        predictions=int(_value(m.predictions)),
        bad_readings=int(sum(float(v) for _, v in cast(Any, m.bad_readings).get_all())),
        latency_buckets=_histogram_buckets(m.latency),
        drift_score=None if math.isnan(score) else score,
        drift_detected=_value(m.drift_detected) >= 1,
        drift_events=int(_value(m.drift_events)),
        backlog=int(_value(m.backlog)),
        metrics_port=metrics_port,
    )


def _number(collector: Any) -> float | None:
    """An unlabelled gauge, None while it is NaN (nothing measured yet)."""
    v = _value(collector)
    return None if math.isnan(v) else v


def _value(collector: Any) -> float:
    """An unlabelled aioprometheus counter or gauge (0 before its first value)."""
    try:
        return float(collector.get({}))
    except KeyError:
        return 0.0


def _histogram_buckets(collector: Any) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of an unlabelled aioprometheus histogram."""
    try:
        data: Mapping[Any, Any] = collector.get({})
    except KeyError:  # nothing observed yet
        return []
    return sorted((float(k), float(v)) for k, v in data.items() if not isinstance(k, str))
