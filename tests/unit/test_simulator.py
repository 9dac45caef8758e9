"""Unit tests for the pure part of sensor_predictor.simulator (no database)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from sklearn.cluster import KMeans
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from sensor_predictor.drift import DriftTracker, js_divergence
from sensor_predictor.simulator import (
    FEATURE_NAMES,
    SIGNATURES,
    Simulator,
    generate_feature_matrix,
)

WINDOW = 100  # the default DRIFT_DETECTION_WINDOW
THRESHOLD = 0.1  # the default DRIFT_THRESHOLD
CLUSTERS = 4


def _window_js(labels: npt.NDArray[Any], reference: npt.NDArray[np.float64]) -> list[float]:
    """JS divergence of each window of WINDOW consecutive labels against the reference."""
    usable = labels[: labels.size - labels.size % WINDOW].reshape(-1, WINDOW)
    return [js_divergence(np.bincount(w, minlength=CLUSTERS), reference) for w in usable]


@pytest.fixture(scope="module")
def model() -> tuple[Pipeline, npt.NDArray[np.float64]]:
    """KMeans(4) fitted on 5,000 normal readings, and its training cluster proportions."""
    train = generate_feature_matrix(5_000, machines=10, seed=0)
    pipeline = Pipeline([("scaler", StandardScaler()),
                         ("kmeans", KMeans(CLUSTERS, random_state=0, n_init=4))])
    labels = pipeline.fit_predict(train)
    return pipeline, np.bincount(labels, minlength=CLUSTERS) / labels.size


# ------------------------------------------------------------------- shape and determinism


def test_readings_are_round_robin_with_named_features_in_order() -> None:
    readings = Simulator(machines=3, seed=1).next_batch(9)
    assert [r.machine for r in readings] == [0, 1, 2] * 3
    assert [r.index for r in readings] == list(range(9))
    for r in readings:
        assert list(r.values) == [f"Sensor {i}" for i in range(1, 21)]
        assert all(isinstance(v, float) for v in r.values.values())
        assert r.in_episode == (r.episode is not None) == (r.signature is not None)


def test_same_seed_same_stream_however_it_is_sliced() -> None:
    whole = Simulator(machines=10, seed=42).next_block(3_000)
    sim = Simulator(machines=10, seed=42)
    parts = [sim.next_block(n) for n in (1, 2, 997, 0, 2_000)]
    assert sim.emitted == 3_000
    np.testing.assert_array_equal(np.concatenate([p.values for p in parts]), whole.values)
    np.testing.assert_array_equal(np.concatenate([p.episodes for p in parts]), whole.episodes)
    np.testing.assert_array_equal(np.concatenate([p.signatures for p in parts]),
                                  whole.signatures)
    assert [p.start for p in parts] == [0, 1, 3, 1_000, 1_000]
    assert Simulator(machines=10, seed=42).next_batch(50) == whole.readings()[:50]
    other = Simulator(machines=10, seed=43).next_block(3_000)
    assert not np.array_equal(other.values, whole.values)


def test_generate_feature_matrix() -> None:
    matrix = generate_feature_matrix(1_234, machines=10, seed=3)
    assert matrix.shape == (1_234, len(FEATURE_NAMES)) == (1_234, 20)
    assert matrix.dtype == np.float64
    assert matrix.flags["C_CONTIGUOUS"]
    assert np.all(np.isfinite(matrix))
    np.testing.assert_array_equal(matrix, generate_feature_matrix(1_234, machines=10, seed=3))
    np.testing.assert_array_equal(matrix, Simulator(10, seed=3).next_block(1_234).values)


def test_values_stay_around_minus_one_to_one() -> None:
    values = generate_feature_matrix(50_000, seed=4)
    low, high = np.percentile(values, [0.5, 99.5])
    assert -1.1 < low < -0.5
    assert 0.5 < high < 1.1
    assert np.abs(values).max() < 2.5


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="machines"):
        Simulator(machines=0, seed=0)
    with pytest.raises(ValueError, match="n must be"):
        Simulator(machines=1, seed=0).next_block(-1)


# ------------------------------------------------------------------------ failure episodes


def test_episodes_are_contiguous_runs_of_one_machine() -> None:
    block = Simulator(machines=10, seed=5).next_block(100_000)
    numbers = np.unique(block.episodes[block.episodes >= 0])
    assert numbers.size > 20
    # Numbered in stream order, from 0, without gaps.
    np.testing.assert_array_equal(numbers, np.arange(numbers.size))
    first_rows = [int(np.flatnonzero(block.episodes == n)[0]) for n in numbers]
    assert first_rows == sorted(first_rows)
    for n in numbers:
        rows = np.flatnonzero(block.episodes == n)
        assert np.unique(block.machines[rows]).size == 1
        assert np.unique(block.signatures[rows]).size == 1
        # The machine's own readings, back to back (every 10th reading of the stream).
        assert np.all(np.diff(rows) == 10)
        assert rows.size <= 30
    share = float(np.mean(block.episodes >= 0))
    assert 0.01 < share < 0.08, share


def test_episode_signatures_show_in_the_sensors() -> None:
    block = Simulator(machines=10, seed=6).next_block(200_000)
    v, sig = block.values, block.signatures
    col = {name: i for i, name in enumerate(FEATURE_NAMES)}
    normal = sig < 0
    codes = {name: SIGNATURES.index(name) for name in SIGNATURES}
    assert all(np.sum(sig == c) > 500 for c in codes.values())
    s9_normal = v[normal, col["Sensor 9"]].mean()
    assert v[sig == codes["sensor9_high"], col["Sensor 9"]].mean() > s9_normal + 0.5
    assert v[sig == codes["sensor9_low"], col["Sensor 9"]].mean() < s9_normal - 0.5
    both = sig == codes["sensors2_13"]
    assert v[both, col["Sensor 2"]].mean() > v[normal, col["Sensor 2"]].mean() + 0.5
    assert v[both, col["Sensor 13"]].mean() < v[normal, col["Sensor 13"]].mean() - 0.5
    # The other signatures leave Sensor 2 alone.
    others = (sig >= 0) & ~both
    assert abs(v[others, col["Sensor 2"]].mean() - v[normal, col["Sensor 2"]].mean()) < 0.05


def test_drift_raises_the_episode_rate() -> None:
    normal = Simulator(machines=10, seed=7).next_block(100_000)
    drifted = Simulator(machines=10, seed=7, drift=True).next_block(100_000)
    assert np.mean(drifted.episodes >= 0) > 2.5 * np.mean(normal.episodes >= 0)


# ------------------------------------------------------------ stationarity and drift (JS)


def test_window_divergence_of_the_normal_stream_stays_far_below_the_threshold(
    model: tuple[Pipeline, npt.NDArray[np.float64]], record_testsuite_property: Any,
) -> None:
    pipeline, reference = model
    stream = Simulator(machines=10, seed=1).next_block(200_000)
    scores = _window_js(pipeline.predict(stream.values), reference)
    assert len(scores) == 2_000
    worst = max(scores)
    record_testsuite_property("max_window_js", worst)
    print(f"normal stream: max window JS {worst:.4f}, mean {np.mean(scores):.5f}")
    assert worst < 0.05 < THRESHOLD


def test_a_drift_tracker_over_a_million_readings_raises_nothing(
    model: tuple[Pipeline, npt.NDArray[np.float64]], record_testsuite_property: Any,
) -> None:
    pipeline, reference = model
    labels = pipeline.predict(Simulator(machines=10, seed=2).next_block(1_000_000).values)
    tracker = DriftTracker(CLUSTERS, WINDOW, THRESHOLD, 0.75 * THRESHOLD,
                           reference=reference.tolist())
    rng = np.random.default_rng(0)
    # Batches of varying size, as the worker sees them: the window slides by each batch.
    cuts = np.cumsum(rng.integers(1, 200, size=20_000))
    cuts = cuts[cuts < labels.size]
    worst = 0.0
    for batch in np.split(labels, cuts):
        update = tracker.update(batch)
        assert update.event is None
        worst = max(worst, update.score or 0.0)
    record_testsuite_property("tracker_max_js", worst)
    print(f"tracker over 1,000,000 readings: max JS {worst:.4f}")
    assert worst < 0.05


@pytest.mark.parametrize("machines", [4, 7, 10, 25])
def test_other_fleet_sizes_look_alike(
    model: tuple[Pipeline, npt.NDArray[np.float64]], machines: int,
) -> None:
    pipeline, reference = model
    stream = Simulator(machines=machines, seed=8).next_block(20_000)
    assert max(_window_js(pipeline.predict(stream.values), reference)) < 0.05


def test_the_drifted_stream_exceeds_the_threshold(
    model: tuple[Pipeline, npt.NDArray[np.float64]], record_testsuite_property: Any,
) -> None:
    pipeline, reference = model
    drifted = Simulator(machines=10, seed=3, drift=True).next_block(20_000)
    scores = _window_js(pipeline.predict(drifted.values), reference)
    mean = float(np.mean(scores))
    record_testsuite_property("drifted_mean_js", mean)
    print(f"drifted stream: mean window JS {mean:.4f}, min {min(scores):.4f}")
    assert mean > 2 * THRESHOLD
    assert min(scores) > THRESHOLD  # every window, the first one included


def test_a_tracker_reports_drift_within_a_window_of_its_start(
    model: tuple[Pipeline, npt.NDArray[np.float64]],
) -> None:
    pipeline, reference = model
    before = pipeline.predict(Simulator(machines=10, seed=4).next_block(5_000).values)
    after = pipeline.predict(Simulator(machines=10, seed=5, drift=True).next_block(500).values)
    tracker = DriftTracker(CLUSTERS, WINDOW, THRESHOLD, 0.75 * THRESHOLD,
                           reference=reference.tolist())
    assert all(tracker.update(batch).event is None for batch in np.split(before, 50))
    started_after = next(
        (i + 1 for i in range(after.size) if tracker.update(after[i:i + 1]).event == "started"),
        None)
    assert started_after is not None
    assert started_after <= WINDOW, started_after
