"""The worker's control flow as pure functions: adaptive claim sizes and retry delays."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sensor_predictor.metrics import Metrics
from sensor_predictor.snapshot import take_snapshot
from sensor_predictor.worker import (
    CONNECT_BACKOFF,
    DRAIN_BATCH_FACTOR,
    RETRY_BACKOFF,
    next_backoff,
    next_batch_size,
    retry_backoff,
)

BASE = 100


def test_a_full_claim_doubles_the_next_one() -> None:
    assert next_batch_size(BASE, BASE, BASE) == 2 * BASE
    assert next_batch_size(400, 400, BASE) == 800


def test_a_claim_that_came_back_short_returns_to_the_configured_size() -> None:
    assert next_batch_size(800, 799, BASE) == BASE
    assert next_batch_size(BASE, 0, BASE) == BASE


def test_claims_grow_to_the_drain_ceiling_and_stay_there_while_behind() -> None:
    size, sizes = BASE, []
    for _ in range(8):  # always full: a backlog
        size = next_batch_size(size, size, BASE)
        sizes.append(size)
    assert sizes[:3] == [200, 400, 800]
    assert max(sizes) == BASE * DRAIN_BATCH_FACTOR
    assert sizes[-1] == BASE * DRAIN_BATCH_FACTOR
    # Caught up: one short claim, straight back to the configured size.
    assert next_batch_size(size, 3, BASE) == BASE


@pytest.mark.parametrize("base", [1, 7, 100, 1000])
def test_a_claim_size_is_never_below_the_base_or_above_the_ceiling(base: int) -> None:
    for current, scored in itertools.product(
            [base, base * 2, base * DRAIN_BATCH_FACTOR], [0, 1, base, base * 20]):
        assert base <= next_batch_size(current, scored, base) <= base * DRAIN_BATCH_FACTOR


@pytest.mark.parametrize("bounds", [CONNECT_BACKOFF, RETRY_BACKOFF])
def test_backoff_doubles_up_to_its_ceiling(bounds: tuple[float, float]) -> None:
    first, ceiling = bounds
    delays = [first]
    for _ in range(10):
        delays.append(next_backoff(delays[-1], bounds))
    assert delays[:3] == [first, first * 2, first * 4]
    assert all(b >= a for a, b in itertools.pairwise(delays))
    assert max(delays) == ceiling and delays[-1] == ceiling


def test_the_connect_backoff_is_the_documented_one() -> None:
    # README: the worker retries the database at its start from 0.2 s, doubling to 5 s.
    assert CONNECT_BACKOFF == (0.2, 5.0)


def test_a_failed_pass_backs_off_until_the_listener_is_back() -> None:
    delay = RETRY_BACKOFF[0]
    for _ in range(3):
        delay = retry_backoff(delay, reconnected=False)
    assert delay == RETRY_BACKOFF[0] * 8
    # The listen connection came back: the database answers, retry at once next time.
    assert retry_backoff(delay, reconnected=True) == RETRY_BACKOFF[0]
    assert retry_backoff(RETRY_BACKOFF[1], reconnected=False) == RETRY_BACKOFF[1]


def test_a_snapshot_says_what_the_metrics_say() -> None:
    m = Metrics()
    empty = take_snapshot(m, ready=False, model_version=None, metrics_port=None)
    assert (empty.predictions, empty.bad_readings, empty.latency_buckets) == (0, 0, [])
    assert empty.drift_score is None and not empty.drift_detected

    m.count_batch(np.array([0, 1, 1], dtype=np.int64))
    m.count_bad(["not_a_number", "missing_sensor"])
    m.latency.observe_many({}, np.array([0.002, 0.004, 0.5]))
    m.drift_score.set({}, 0.25)
    m.drift_detected.set({}, 1)
    m.drift_events.inc({})
    m.backlog.set({}, 42)
    snap = take_snapshot(m, ready=True, model_version="3", metrics_port=8001)
    assert snap.predictions == 3 and snap.bad_readings == 2
    assert snap.drift_score == 0.25 and snap.drift_detected and snap.drift_events == 1
    assert snap.backlog == 42 and snap.model_version == "3" and snap.ready
    bounds = [b for b, _ in snap.latency_buckets]
    assert bounds == sorted(bounds) and bounds[-1] == float("inf")
    assert snap.latency_buckets[-1][1] == 3
