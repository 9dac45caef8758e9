"""Unit tests for sensor_predictor.drift (pure, no database)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import jensenshannon

from sensor_predictor.drift import (
    DriftTracker,
    DriftUpdate,
    distribution_to_json,
    js_divergence,
)

# --------------------------------------------------------------------------- helpers


def _scipy_js(p: list[float], q: list[float]) -> float:
    """Reference value: squared base-2 JS distance, as scipy computes it."""
    with np.errstate(invalid="ignore"):
        # Rounding can make scipy's inner sum a hair negative, and its sqrt then NaN.
        d = float(jensenshannon(p, q, base=2))
    return 0.0 if math.isnan(d) else d**2


def _batch(n_ones: int, size: int = 100) -> np.ndarray[Any, np.dtype[np.intp]]:
    """A two-cluster batch with exactly `n_ones` readings of cluster 1."""
    return np.array([1] * n_ones + [0] * (size - n_ones), dtype=np.intp)


def _events(updates: list[DriftUpdate]) -> list[str]:
    return [u.event for u in updates if u.event is not None]


# --------------------------------------------------------------------------- js_divergence


_weights = st.one_of(
    st.just(0.0),
    st.floats(min_value=1e-6, max_value=1e3, allow_nan=False, allow_infinity=False),
    st.integers(min_value=0, max_value=1000).map(float),
)


@st.composite
def _vector_pairs(draw: st.DrawFn) -> tuple[list[float], list[float]]:
    n = draw(st.integers(min_value=1, max_value=20))
    vec = st.lists(_weights, min_size=n, max_size=n).filter(lambda v: sum(v) > 0)
    return draw(vec), draw(vec)


@settings(max_examples=500, deadline=None, database=None)
@given(_vector_pairs())
def test_js_divergence_matches_scipy(pair: tuple[list[float], list[float]]) -> None:
    p, q = pair
    ours = js_divergence(p, q)
    assert 0.0 <= ours <= 1.0
    assert ours == pytest.approx(_scipy_js(p, q), abs=1e-9)


@settings(max_examples=100, deadline=None, database=None)
@given(_vector_pairs())
def test_js_divergence_symmetric_and_scale_invariant(
    pair: tuple[list[float], list[float]],
) -> None:
    p, q = pair
    assert js_divergence(p, q) == pytest.approx(js_divergence(q, p), abs=1e-12)
    assert js_divergence(p, q) == pytest.approx(js_divergence([7 * x for x in p], q), abs=1e-12)
    assert js_divergence(p, p) == pytest.approx(0.0, abs=1e-12)


def test_js_divergence_disjoint_support_is_one() -> None:
    assert js_divergence([1, 0, 0], [0, 3, 2]) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    ("p", "q"),
    [
        ([1.0, 2.0], [1.0, 2.0, 3.0]),
        ([], []),
        ([0.0, 0.0], [1.0, 1.0]),
        ([-1.0, 2.0], [1.0, 1.0]),
        ([math.nan, 1.0], [1.0, 1.0]),
        ([[1.0, 2.0]], [[1.0, 2.0]]),
    ],
)
def test_js_divergence_rejects_bad_input(p: list[Any], q: list[Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message varies by case
        js_divergence(p, q)


def test_distribution_to_json() -> None:
    assert distribution_to_json((0.25, 0.75)) == {"0": 0.25, "1": 0.75}
    out = distribution_to_json(list(np.array([0.5, 0.5])))
    assert all(type(v) is float for v in out.values())


# --------------------------------------------------------------------------- window


@settings(max_examples=200, deadline=None, database=None)
@given(
    n_clusters=st.integers(min_value=1, max_value=6),
    window=st.integers(min_value=1, max_value=40),
    data=st.data(),
)
def test_window_counts_match_last_w_labels(
    n_clusters: int, window: int, data: st.DataObject
) -> None:
    # Mostly batches up to one window (so the ring wraps and partially fills), some up to
    # three windows (a batch larger than the window keeps only its tail).
    sizes = data.draw(
        st.lists(
            st.one_of(
                st.integers(min_value=0, max_value=window),
                st.integers(min_value=window, max_value=3 * window),
            ),
            min_size=1,
            max_size=30,
        ),
        label="sizes",
    )
    seed = data.draw(st.integers(min_value=0, max_value=2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    tracker = DriftTracker(n_clusters, window, threshold=0.5, exit_threshold=0.25)
    seen = np.zeros(0, dtype=np.intp)
    for size in sizes:
        batch = rng.integers(0, n_clusters, size=size)
        seen = np.concatenate([seen, batch])
        upd = tracker.update(batch)

        expected = np.bincount(seen[-window:], minlength=n_clusters)
        assert tracker.counts.tolist() == expected.tolist()
        fill = min(seen.size, window)
        assert upd.window_fill == tracker.window_fill == fill
        assert tracker.window_full is (fill == window)
        if fill:
            assert upd.current == pytest.approx(tuple(expected / fill))
        if fill == window:
            assert upd.reference is not None
            assert upd.score == pytest.approx(js_divergence(upd.reference, expected), abs=1e-12)
        else:
            assert upd.score is None
            assert upd.event is None


def test_no_score_until_window_full() -> None:
    tracker = DriftTracker(2, 10, threshold=0.1, exit_threshold=0.05, reference=[0.5, 0.5])
    first = tracker.update(np.array([1, 1, 1, 1, 1, 1, 1, 1, 1]))
    assert first.score is None
    assert first.event is None
    assert first.window_fill == 9
    assert tracker.score is None
    assert not tracker.window_full
    second = tracker.update(np.array([1]))
    assert second.score == pytest.approx(js_divergence([0.5, 0.5], [0, 1]))
    assert second.event == "started"
    assert tracker.window_full


def test_reference_from_training_proportions() -> None:
    tracker = DriftTracker(3, 4, threshold=0.5, exit_threshold=0.4, reference=[2, 1, 1])
    assert tracker.reference == pytest.approx((0.5, 0.25, 0.25))
    upd = tracker.update(np.array([0, 0, 0, 0]))
    assert upd.reference == pytest.approx((0.5, 0.25, 0.25))
    assert upd.score == pytest.approx(js_divergence([2, 1, 1], [1, 0, 0]))


def test_reference_from_first_full_window() -> None:
    tracker = DriftTracker(3, 4, threshold=0.5, exit_threshold=0.4)
    upd = tracker.update(np.array([0, 1]))
    assert upd.reference is None
    assert tracker.reference is None
    upd = tracker.update(np.array([1, 2]))
    assert upd.reference == pytest.approx((0.25, 0.5, 0.25))
    assert upd.score == 0.0
    # The reference stays fixed as the window slides on.
    upd = tracker.update(np.array([0, 0, 0, 0]))
    assert upd.reference == pytest.approx((0.25, 0.5, 0.25))
    assert upd.current == (1.0, 0.0, 0.0)
    assert upd.score == pytest.approx(js_divergence([1, 2, 1], [1, 0, 0]))


def test_empty_batch_is_a_no_op_for_the_window() -> None:
    tracker = DriftTracker(2, 2, threshold=0.5, exit_threshold=0.4)
    assert tracker.update(np.array([], dtype=np.int64)).window_fill == 0
    assert tracker.update([]).current == (0.0, 0.0)
    tracker.update(np.array([0, 1]))
    assert tracker.update(np.array([], dtype=np.int32)).score == 0.0


@pytest.mark.parametrize(
    "labels",
    [
        np.array([0, 3]),
        np.array([-1, 0]),
        np.array([0.0, 1.0]),
        np.array([[0, 1]]),
    ],
)
def test_update_rejects_bad_labels(labels: np.ndarray[Any, Any]) -> None:
    tracker = DriftTracker(3, 5, threshold=0.5, exit_threshold=0.4)
    with pytest.raises(ValueError):  # noqa: PT011 - the message varies by case
        tracker.update(labels)
    assert tracker.window_fill == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_clusters": 0},
        {"window": 0},
        {"threshold": 1.5, "exit_threshold": 0.5},
        {"threshold": 0.2, "exit_threshold": 0.3},
        {"threshold": 0.2, "exit_threshold": -0.1},
        {"threshold": math.nan},
        {"reference": [0.5, 0.5]},
        {"reference": [0.0, 0.0, 0.0]},
        {"reference": [0.5, -0.5, 1.0]},
    ],
)
def test_constructor_validation(kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"n_clusters": 3, "window": 10, "threshold": 0.2, "exit_threshold": 0.1}
    args.update(kwargs)
    with pytest.raises(ValueError):  # noqa: PT011 - the message varies by case
        DriftTracker(**args)


def test_update_touches_only_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Structural cost check: counting work is O(batch), however big the window is."""
    window = 1_000_000
    tracker = DriftTracker(4, window, threshold=0.5, exit_threshold=0.4)
    rng = np.random.default_rng(1)
    tracker.update(rng.integers(0, 4, size=window))

    seen: list[int] = []
    real_bincount = np.bincount

    def spy(x: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(int(np.size(x)))
        return real_bincount(x, *args, **kwargs)

    monkeypatch.setattr(np, "bincount", spy)
    for _ in range(5):
        seen.clear()
        tracker.update(rng.integers(0, 4, size=100))
        # What enters plus what leaves, nothing more.
        assert sum(seen) == 200


# --------------------------------------------------------------------------- hysteresis


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stationary_shift_stationary_has_one_excursion(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ref = [0.4, 0.3, 0.2, 0.1]
    shifted = [0.05, 0.05, 0.1, 0.8]
    tracker = DriftTracker(4, 500, threshold=0.1, exit_threshold=0.075, reference=ref)
    updates = [
        tracker.update(rng.choice(4, size=50, p=p))
        for p, n_batches in ((ref, 60), (shifted, 60), (ref, 60))
        for _ in range(n_batches)
    ]
    events = _events(updates)
    assert events[0] == "started"
    assert events[-1] == "ended"
    assert events.count("started") == 1
    assert events.count("ended") == 1
    assert set(events[1:-1]) == {"ongoing"}
    assert len(events) > 2
    started = next(i for i, u in enumerate(updates) if u.event == "started")
    ended = next(i for i, u in enumerate(updates) if u.event == "ended")
    # Peak tracks the maximum score over the excursion and is reported on "ended".
    scores = [u.score for u in updates[started:ended] if u.score is not None]
    assert updates[ended].peak == pytest.approx(max(scores))
    assert updates[ended + 1].peak is None
    assert not tracker.in_excursion


def test_hovering_between_exit_and_threshold_does_not_restart() -> None:
    # Reference [0.5, 0.5]: 85 ones -> 0.105, 80 -> 0.073, 90 -> 0.147, 70 -> 0.030.
    tracker = DriftTracker(2, 100, threshold=0.1, exit_threshold=0.05, reference=[0.5, 0.5])
    ones = [50, 85, 80, 90, 80, 85, 80, 90, 70, 50, 85]
    updates = [tracker.update(_batch(n)) for n in ones]
    assert [u.event for u in updates] == [
        None,
        "started",
        "ongoing",
        "ongoing",
        "ongoing",
        "ongoing",
        "ongoing",
        "ongoing",
        "ended",
        None,
        "started",
    ]
    assert updates[2].peak == pytest.approx(js_divergence([1, 1], [15, 85]))
    assert updates[3].peak == pytest.approx(js_divergence([1, 1], [10, 90]))
    assert updates[8].peak == pytest.approx(js_divergence([1, 1], [10, 90]))
    assert updates[10].peak == pytest.approx(js_divergence([1, 1], [15, 85]))


def test_score_equal_to_threshold_does_not_start() -> None:
    tracker = DriftTracker(2, 100, threshold=0.0, exit_threshold=0.0, reference=[0.5, 0.5])
    assert tracker.update(_batch(50)).event is None
    assert tracker.update(_batch(51)).event == "started"
    # Equal to the exit level keeps the excursion open.
    assert tracker.update(_batch(50)).event == "ongoing"


@pytest.mark.parametrize(
    ("n_ones", "expected"),
    [(80, "ongoing"), (90, "ongoing"), (70, "ended"), (50, "ended")],
)
def test_resume_open_excursion(n_ones: int, expected: str) -> None:
    tracker = DriftTracker(
        2, 100, threshold=0.1, exit_threshold=0.05, reference=[0.5, 0.5], in_excursion=True
    )
    assert tracker.in_excursion
    partial = tracker.update(_batch(40, size=60))
    assert partial.event is None
    assert partial.score is None
    first = tracker.update(_batch(n_ones))
    assert first.event == expected
    assert tracker.in_excursion is (expected == "ongoing")
    if expected == "ongoing":
        assert first.peak == pytest.approx(first.score)
        # A later rise above the threshold continues the same excursion.
        assert tracker.update(_batch(95)).event == "ongoing"
    else:
        # Nothing above the exit level was seen by this tracker; the stored peak stands.
        assert first.peak is None
        assert tracker.update(_batch(50)).event is None


def test_resumed_excursion_without_flag_starts_afresh() -> None:
    tracker = DriftTracker(2, 100, threshold=0.1, exit_threshold=0.05, reference=[0.5, 0.5])
    assert tracker.update(_batch(80)).event is None
    assert tracker.update(_batch(90)).event == "started"


def test_iid_stream_from_reference_never_starts() -> None:
    ref = [0.4, 0.3, 0.2, 0.1]
    rng = np.random.default_rng(20240601)
    labels = rng.choice(4, size=1_000_000, p=ref)
    tracker = DriftTracker(4, 100, threshold=0.1, exit_threshold=0.075, reference=ref)
    started = 0
    max_score = 0.0
    for batch in labels.reshape(-1, 100):
        upd = tracker.update(batch)
        started += upd.event == "started"
        max_score = max(max_score, upd.score or 0.0)
    assert started == 0
    assert tracker.window_full
    assert max_score < 0.1


# -- the significance rule (DRIFT_P_VALUE) --------------------------------------------------


@pytest.mark.parametrize(("counts", "reference"), [
    ([30, 20, 25, 25], [0.25, 0.25, 0.25, 0.25]),
    ([5, 0, 40, 5], [0.1, 0.2, 0.6, 0.1]),
    ([1, 2, 3, 994], [0.4, 0.3, 0.2, 0.1]),
])
def test_the_p_value_is_scipy_stats_g_test(counts: list[int], reference: list[float]) -> None:
    from scipy.stats import power_divergence

    from sensor_predictor.drift import g_test_p_value

    expected = np.asarray(reference) * sum(counts)
    want = power_divergence(counts, expected, lambda_="log-likelihood").pvalue
    assert g_test_p_value(counts, reference) == pytest.approx(want, rel=1e-9, abs=1e-300)


def test_a_cluster_the_reference_never_sees_is_impossible_and_an_unused_one_is_dropped() -> None:
    from sensor_predictor.drift import g_test_p_value

    assert g_test_p_value([10, 1], [1.0, 0.0]) == 0.0
    assert g_test_p_value([10, 0, 10], [0.5, 0.0, 0.5]) == pytest.approx(1.0)


def _stationary_alarms(window: int, p_value: float, n: int = 300_000, batch: int = 10) -> int:
    """Drift events opened on a stationary stream of 12 clusters, some rare (the case where a
    small window's JS score is noisiest)."""
    rng = np.random.default_rng(window)
    reference = np.geomspace(1, 0.05, 12)
    reference /= reference.sum()
    tracker = DriftTracker(12, window, 0.1, 0.075, reference=reference.tolist(),
                           p_value=p_value)
    labels = rng.choice(12, size=n, p=reference)
    return sum(tracker.update(labels[i:i + batch]).event == "started"
               for i in range(0, n, batch))


def test_a_small_window_alarms_on_noise_without_the_p_value_rule_far_less_with_it() -> None:
    # Window 50, stationary stream: the JS score alone crosses 0.1 by chance, over and over.
    without = _stationary_alarms(50, p_value=1.0)
    assert without > 100
    assert _stationary_alarms(50, p_value=0.001) < without / 5


def test_a_real_shift_still_opens_an_event_with_the_p_value_rule() -> None:
    tracker = DriftTracker(4, 100, 0.1, 0.075, reference=[0.4, 0.3, 0.2, 0.1], p_value=0.001)
    rng = np.random.default_rng(3)
    events = [tracker.update(rng.choice(4, size=10, p=[0.1, 0.2, 0.3, 0.4])).event
              for _ in range(20)]
    assert "started" in events
    assert tracker.p_value is not None and tracker.p_value < 1e-6


def test_the_p_value_rule_rejects_a_threshold_outside_its_range() -> None:
    with pytest.raises(ValueError, match="p_value"):
        DriftTracker(4, 100, 0.1, 0.075, p_value=0.0)
