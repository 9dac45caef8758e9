"""Shadow scoring's arithmetic: windows of readings, agreement and the candidate's drift."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import adjusted_rand_score

from sensor_predictor.drift import g_test_p_value, js_divergence
from sensor_predictor.shadow import ShadowWindow, WindowSample, adjusted_rand_index, evaluate


def _batch(start: int, n: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    ids = np.arange(start, start + n)
    active = rng.integers(0, 4, n)
    labels = rng.integers(0, 4, n)
    return ids, active, labels + 10, labels


def test_windows_do_not_overlap_and_keep_every_reading_in_order() -> None:
    window = ShadowWindow(100)
    done = []
    start = 0
    for n in (30, 30, 90, 1, 49, 250):  # batches across window edges, one spanning three
        done += window.add(*_batch(start, n, start))
        start += n
    assert [int(s.reading_ids.size) for s in done] == [100, 100, 100, 100]
    assert window.filled == 50
    joined = np.concatenate([s.reading_ids for s in done])
    assert joined.tolist() == list(range(400))


def test_a_batch_whose_arrays_differ_in_length_is_refused() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        ShadowWindow(10).add([1, 2], [0, 0], [0], [0, 0])
    with pytest.raises(ValueError, match="at least 2"):
        ShadowWindow(1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=2, max_size=300))
def test_agreement_is_scikit_learns_adjusted_rand_index_and_the_same_id_share(
        pairs: list[tuple[int, int]]) -> None:
    active = np.asarray([a for a, _ in pairs])
    candidate = np.asarray([c for _, c in pairs])
    sample = WindowSample(np.arange(len(pairs)), active, candidate, candidate)
    e = evaluate(sample, 6, None)
    assert e.adjusted_rand_index == pytest.approx(adjusted_rand_score(active, candidate),
                                                  abs=1e-12)
    assert e.same_id_share == pytest.approx(float(np.mean(active == candidate)))
    assert e.candidate_drift_score is None and e.candidate_p_value is None


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=0, max_size=200))
def test_the_contingency_ari_equals_scikit_learns(pairs: list[tuple[int, int]]) -> None:
    a = [x for x, _ in pairs]
    b = [y for _, y in pairs]
    expected = adjusted_rand_score(a, b) if pairs else 1.0
    assert adjusted_rand_index(a, b) == pytest.approx(expected, abs=1e-12)


def test_the_contingency_ari_does_not_overflow_on_a_large_window() -> None:
    rng = np.random.default_rng(7)
    a = rng.integers(0, 12, 1_000_000)
    b = np.where(rng.random(a.size) < 0.9, a, rng.integers(0, 12, a.size))
    assert adjusted_rand_index(a, b) == pytest.approx(adjusted_rand_score(a, b), abs=1e-12)
    with pytest.raises(ValueError, match="differ in length"):
        adjusted_rand_index([0, 1], [0])


def test_a_renumbered_but_identical_grouping_agrees_fully_and_shares_no_id() -> None:
    active = np.repeat(np.arange(4), 25)
    e = evaluate(WindowSample(np.arange(100), active, active + 4, active), 4, None)
    assert e.adjusted_rand_index == pytest.approx(1.0)
    assert e.same_id_share == 0.0  # what stable ids are for: without them, no id matches


def test_the_candidates_drift_is_against_its_own_training_proportions() -> None:
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    reference = (0.5, 0.3, 0.2)
    e = evaluate(WindowSample(np.arange(100, 200), labels, labels, labels), 3, reference)
    assert e.candidate_drift_score == pytest.approx(0.0, abs=1e-12)
    assert e.candidate_p_value == pytest.approx(1.0)
    shifted = np.repeat([0, 1, 2], [10, 10, 80])
    e = evaluate(WindowSample(np.arange(100), labels, shifted, shifted), 3, reference)
    counts = np.bincount(shifted, minlength=3)
    assert e.candidate_drift_score == pytest.approx(js_divergence(counts, reference))
    assert e.candidate_p_value == pytest.approx(g_test_p_value(counts, reference))
    assert e.candidate_p_value < 1e-6
    assert (e.first_reading_id, e.last_reading_id, e.readings) == (0, 99, 100)
    # Proportions that do not fit the candidate's clusters give no drift figure.
    assert evaluate(WindowSample(np.arange(100), labels, shifted, shifted), 4,
                    reference).candidate_drift_score is None
