"""The /metrics text read back, and quantiles from histogram buckets (devtools)."""

from __future__ import annotations

import math

import pytest

from sensor_predictor.devtools.prometheus_text import (
    bucket_delta,
    buckets,
    histogram_quantile,
    parse_metrics,
    quantile_between,
    value,
)

INF = math.inf

EXPOSITION = """\
# HELP sensor_predictions_total Predictions written.
# TYPE sensor_predictions_total counter
sensor_predictions_total 50
sensor_bad_readings_total{reason="missing_sensor"} 1
sensor_drift_score NaN
sensor_ready{} 1
sensor_prediction_latency_seconds_bucket{le="0.01"} 40
sensor_prediction_latency_seconds_bucket{le="0.1"} 48
sensor_prediction_latency_seconds_bucket{le="+Inf"} 50
sensor_prediction_latency_seconds_count 50
"""


def test_parse_keeps_every_series_by_its_text() -> None:
    sample = parse_metrics(EXPOSITION)
    assert sample["sensor_predictions_total"] == 50
    assert value(sample, "sensor_bad_readings_total", 'reason="missing_sensor"') == 1
    assert value(sample, "sensor_ready") == 1  # `name{}` is found without labels too
    assert math.isnan(sample["sensor_drift_score"])
    assert value(sample, "sensor_nothing") is None


def test_buckets_are_read_in_bound_order_with_inf_last() -> None:
    assert buckets(parse_metrics(EXPOSITION)) == [(0.01, 40), (0.1, 48), (INF, 50)]


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    b = [(0.01, 50.0), (0.02, 90.0), (0.05, 100.0), (INF, 100.0)]
    assert histogram_quantile(0.5, b) == pytest.approx(0.01)
    assert histogram_quantile(0.7, b) == pytest.approx(0.015)
    assert histogram_quantile(0.95, b) == pytest.approx(0.035)
    # Ranks in the +Inf bucket report the largest finite bound; no observations: None.
    assert histogram_quantile(0.99, [(0.01, 1.0), (INF, 10.0)]) == pytest.approx(0.01)
    assert histogram_quantile(0.5, [(0.01, 0.0), (INF, 0.0)]) is None
    assert histogram_quantile(0.5, []) is None


def test_empty_buckets_below_the_rank_are_skipped() -> None:
    # Nothing below 0.01, everything in (0.01, 0.02]: the median is inside that bucket.
    b = [(0.005, 0.0), (0.01, 0.0), (0.02, 10.0), (INF, 10.0)]
    assert histogram_quantile(0.5, b) == pytest.approx(0.015)
    assert histogram_quantile(0.0, b) == pytest.approx(0.01)


def test_a_quantile_between_two_scrapes_counts_only_what_happened_between() -> None:
    before = parse_metrics(EXPOSITION)
    after = dict(before)
    # 10 more observations, all in (0.01, 0.1]
    after['sensor_prediction_latency_seconds_bucket{le="0.1"}'] += 10
    after['sensor_prediction_latency_seconds_bucket{le="+Inf"}'] += 10
    assert bucket_delta(buckets(after), buckets(before)) == [(0.01, 0), (0.1, 10), (INF, 10)]
    assert quantile_between(0.5, before, after) == pytest.approx(0.055)
    assert quantile_between(0.5, before, before) is None
