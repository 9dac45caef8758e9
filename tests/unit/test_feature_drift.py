"""The per-feature drift and outlier arithmetic (feature_drift.py), on synthetic streams."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sensor_predictor.feature_drift import (
    FALSE_ALARM_BUDGET,
    ExcursionState,
    FeatureDriftTracker,
    FeatureReference,
    OutlierTracker,
    binomial_tail,
    design_effects,
    reference_from_kernel,
    reference_from_training,
)

NAMES = tuple(f"Sensor {i}" for i in range(1, 21))
WINDOW = 100


def _reference(mean: float = 0.0, std: float = 1.0) -> FeatureReference:
    return FeatureReference(NAMES, (mean,) * 20, (std,) * 20)


def _first_open(tracker: FeatureDriftTracker, rows: np.ndarray, step: int = 1) -> int | None:
    for i in range(0, rows.shape[0], step):
        state = tracker.update(rows[i:i + step])
        if state is not None and state.drifting:
            return i + step
    return None


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), mean=st.floats(-100, 100), std=st.floats(0.01, 100),
       batch=st.sampled_from([1, 7, 10, 100, 250]))
def test_a_stationary_stream_stays_quiet(seed: int, mean: float, std: float, batch: int) -> None:
    rng = np.random.default_rng(seed)
    tracker = FeatureDriftTracker(_reference(mean, std), WINDOW)
    rows = rng.normal(mean, std, size=(3000, 20))
    assert _first_open(tracker, rows, batch) is None


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), sensor=st.integers(0, 19),
       sign=st.sampled_from([-1.0, 1.0]))
def test_a_one_sigma_shift_of_one_sensor_opens_within_one_window_naming_it_first(
        seed: int, sensor: int, sign: float) -> None:
    rng = np.random.default_rng(seed)
    tracker = FeatureDriftTracker(_reference(5.0, 2.0), WINDOW)
    assert _first_open(tracker, rng.normal(5.0, 2.0, size=(300, 20)), 10) is None
    shifted = rng.normal(5.0, 2.0, size=(WINDOW, 20))
    shifted[:, sensor] += sign * 2.0  # one training standard deviation
    opened = _first_open(tracker, shifted, 1)
    assert opened is not None and opened <= WINDOW
    state = tracker.state()
    assert state.ranked[0].feature == NAMES[sensor]
    assert math.copysign(1.0, state.ranked[0].effect) == sign


def test_the_significance_is_bonferroni_of_the_budget_and_the_effect_gates_it() -> None:
    tracker = FeatureDriftTracker(_reference(), WINDOW, effect_threshold=0.5)
    assert tracker.alpha == pytest.approx(FALSE_ALARM_BUDGET / 20)
    rows = np.zeros((WINDOW, 20))
    rows[:, 3] = 0.55  # z = 5.5: p ~ 4e-8 > 5e-9, not significant though past the effect
    state = tracker.update(rows)
    assert state is not None and not state.drifting and state.holding
    rows[:, 3] = 0.6  # z = 6: p ~ 2e-9
    state = tracker.update(rows)
    assert state is not None and state.drifting
    assert state.ranked[0].feature == "Sensor 4" and state.ranked[0].z == pytest.approx(6.0)
    wide = FeatureDriftTracker(_reference(), 10_000, effect_threshold=0.5)
    rows = np.zeros((10_000, 20))
    rows[:, 3] = 0.4  # z = 40, but a small effect: not drift
    state = wide.update(rows)
    assert state is not None and not state.drifting


def test_the_running_sums_equal_the_window_whatever_the_batches() -> None:
    rng = np.random.default_rng(3)
    tracker = FeatureDriftTracker(_reference(), 37)
    rows = rng.normal(size=(5000, 20))
    i = 0
    while i < rows.shape[0]:
        k = int(rng.integers(1, 60))
        tracker.update(rows[i:i + k])
        i += k
    expected = rows[-37:].mean(axis=0)
    state = tracker.state()
    assert np.allclose(state.scores, np.abs(expected))


def test_autocorrelation_widens_the_test_by_its_design_effect() -> None:
    rng = np.random.default_rng(4)
    n = 200_000
    noise = rng.normal(size=(n, 20))
    x = np.empty_like(noise)
    x[0] = noise[0]
    for t in range(1, n):  # AR(1), phi 0.9: a window's mean varies ~19x more than iid
        x[t] = 0.9 * x[t - 1] + math.sqrt(1 - 0.81) * noise[t]
    effects = dict(design_effects(x[:50_000], x[:50_000].std(axis=0)))
    assert 12 < float(np.mean(effects[100])) < 30
    ref = FeatureReference(NAMES, tuple(x.mean(axis=0)), tuple(x.std(axis=0)),
                           inflation=design_effects(x[:50_000], x[:50_000].std(axis=0)))
    corrected = FeatureDriftTracker(ref, WINDOW)
    naive = FeatureDriftTracker(FeatureReference(NAMES, ref.mean, ref.std), WINDOW)
    assert _first_open(naive, x[50_000:], 10) is not None
    assert _first_open(corrected, x[50_000:], 10) is None


def test_the_reference_of_a_model_without_one_is_its_scaler() -> None:
    ref = reference_from_kernel(("a", "b"), np.array([1.0, 2.0]), np.array([3.0, 4.0]))
    assert (ref.mean, ref.std, ref.source, ref.distance_p99) == ((1.0, 2.0), (3.0, 4.0),
                                                                   "scaler", None)
    # The old trainer's episode columns: each sensor's `_mean` column, not its `_min`.
    features = ("a_max", "a_mean", "a_min", "a_std", "b_max", "b_mean", "b_min", "b_std", "d")
    columns = (0, 0, 0, -1, 1, 1, 1, -1, -1)
    mean = np.arange(9, dtype=float)
    scale = np.arange(1, 10, dtype=float)
    ref = reference_from_kernel(("a", "b"), mean, scale, columns, features)
    assert ref.mean == (1.0, 5.0) and ref.std == (2.0, 6.0)


def test_the_reference_survives_json() -> None:
    rng = np.random.default_rng(5)
    m = rng.normal(size=(5000, 20))
    ref = reference_from_training(NAMES, m, np.abs(rng.normal(size=5000)))
    assert ref.inflation and ref.distance_p99 is not None and ref.distance_p999 is not None
    assert ref.distance_p99 < ref.distance_p999
    assert FeatureReference.from_json(ref.to_json()) == ref


def test_the_outlier_share_and_its_binomial_tail() -> None:
    assert binomial_tail(0, 100, 0.01) == 1.0
    assert binomial_tail(1, 100, 0.01) == pytest.approx(1 - 0.99 ** 100)
    # At window 100 the rule needs 10 outliers (share 0.10) where 1 is expected.
    assert binomial_tail(10, 100, 0.01) < FALSE_ALARM_BUDGET < binomial_tail(9, 100, 0.01)
    tracker = OutlierTracker(threshold_distance=2.0, window=WINDOW)
    assert tracker.update(np.ones(99)) is None
    state = tracker.update(np.ones(1))
    assert state is not None and state.share == 0 and not state.drifting
    state = tracker.update(np.full(9, 3.0))
    assert state is not None and state.share == 0.09 and not state.drifting and state.holding
    state = tracker.update(np.full(1, 3.0))
    assert state is not None and state.share == 0.10 and state.drifting
    assert state.p_value == pytest.approx(binomial_tail(10, 100, 0.01))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_outliers_at_the_training_rate_stay_quiet(seed: int) -> None:
    rng = np.random.default_rng(seed)
    tracker = OutlierTracker(threshold_distance=1.0, window=WINDOW)
    d = (rng.random(20_000) < 0.01).astype(float) * 2.0
    for i in range(0, d.size, 10):
        state = tracker.update(d[i:i + 10])
        assert state is None or not state.drifting


def test_one_excursion_whatever_rule_opens_it_ends_when_all_are_back() -> None:
    ex = ExcursionState()
    assert ex.step({"cluster": False, "feature": False}, {"cluster": False}) == (None, None)
    assert ex.step({"cluster": False, "feature": True}, {"feature": True}) == (
        "started", "feature")
    assert ex.step({"cluster": True}, {"cluster": True, "feature": False}) == (
        "ongoing", "feature")
    assert ex.step({}, {"cluster": False, "feature": False, "outlier": False}) == (
        "ended", "feature")
    assert ex.step({"outlier": True, "cluster": True}, {}) == ("started", "cluster")
