"""Shadow scoring's arithmetic: windows of readings scored by both models, and how the two
agree on them. Pure: no database, no clock; shadow_scorer.py feeds it and writes the rows.

A window is `size` consecutive readings (DRIFT_DETECTION_WINDOW) scored by the active model and
the candidate; windows do not overlap, so each evaluation row covers readings no other row
covers. Per window:
- the adjusted Rand index of the two labelings (`sklearn.metrics.adjusted_rand_score`'s,
  computed from the contingency table by `adjusted_rand_index`): 1 when the candidate groups
  the readings exactly as the active model does, whatever the numbers; about 0 for an
  unrelated grouping;
- the share of readings given the same stable cluster id (what the dashboard by cluster id
  would show after a promotion);
- the candidate's drift against its own training proportions: JS divergence and G-test p-value
  (drift.py), as the drift tracker would see them after a promotion.
Adding a batch is O(batch); an evaluation is O(size + clusters^2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from sensor_predictor.drift import g_test_p_value, js_divergence

__all__ = ["Evaluation", "ShadowWindow", "WindowSample", "adjusted_rand_index", "evaluate"]

_Ints = npt.NDArray[np.int64]


@dataclass(frozen=True)
class WindowSample:
    """One complete window: per reading, in scoring order."""

    reading_ids: _Ints
    active_ids: _Ints  # the active model's stable ids
    candidate_ids: _Ints  # the candidate's stable ids
    candidate_labels: _Ints  # the candidate's own labels (for its drift)


@dataclass(frozen=True)
class Evaluation:
    readings: int
    adjusted_rand_index: float
    same_id_share: float
    candidate_drift_score: float | None  # None: the candidate has no training proportions
    candidate_p_value: float | None
    first_reading_id: int
    last_reading_id: int


class ShadowWindow:
    """Collects readings scored by both models into windows of `size`."""

    def __init__(self, size: int) -> None:
        if size < 2:
            raise ValueError(f"an agreement window needs at least 2 readings, got {size}")
        self.size = size
        self._parts: list[tuple[_Ints, _Ints, _Ints, _Ints]] = []
        self._filled = 0

    @property
    def filled(self) -> int:
        """Readings in the window being filled."""
        return self._filled

    def add(self, reading_ids: npt.ArrayLike, active_ids: npt.ArrayLike,
            candidate_ids: npt.ArrayLike, candidate_labels: npt.ArrayLike) -> list[WindowSample]:
        """Add one batch (four arrays of one length); returns the windows it completed."""
        arrays = tuple(np.asarray(a, dtype=np.int64).ravel()
                       for a in (reading_ids, active_ids, candidate_ids, candidate_labels))
        n = arrays[0].size
        if any(a.size != n for a in arrays):
            raise ValueError(f"a batch's arrays differ in length: {[a.size for a in arrays]}")
        done: list[WindowSample] = []
        start = 0
        while start < n:
            take = min(self.size - self._filled, n - start)
            self._parts.append(tuple(a[start:start + take] for a in arrays))  # type: ignore[arg-type]
            self._filled += take
            start += take
            if self._filled == self.size:
                done.append(WindowSample(*(np.concatenate(column) for column in
                                           zip(*self._parts, strict=True))))
                self._parts, self._filled = [], 0
        return done


def adjusted_rand_index(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """The adjusted Rand index of two labelings of the same readings (non-negative ints), as
    `sklearn.metrics.adjusted_rand_score` computes it (tests/unit/test_shadow.py checks they are
    equal), from the contingency table in O(n + clusters^2): scikit-learn's own input checks cost
    ~0.45 ms a call, which at a window of 100 readings was a third of the shadow's cost."""
    x = np.asarray(a, dtype=np.int64).ravel()
    y = np.asarray(b, dtype=np.int64).ravel()
    if x.size != y.size:
        raise ValueError(f"the labelings differ in length: {x.size} and {y.size}")
    if x.size and (x.min() < 0 or y.min() < 0):
        raise ValueError("labels must be non-negative")
    n = int(x.size)
    if n == 0:
        return 1.0
    width = int(y.max()) + 1
    table = np.bincount(x * width + y, minlength=(int(x.max()) + 1) * width).reshape(-1, width)
    rows, cols = table.sum(axis=1), table.sum(axis=0)
    # The pair confusion matrix (sklearn.metrics.cluster.pair_confusion_matrix), in Python
    # integers: its products overflow int64 from about 55,000 readings.
    squares = int((table.astype(np.int64) ** 2).sum())
    tp = squares - n
    fp = int(table.dot(cols).sum()) - squares
    fn = int(table.T.dot(rows).sum()) - squares
    tn = n * n - fp - fn - squares
    if fn == 0 and fp == 0:  # identical groupings (or a single reading)
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def evaluate(sample: WindowSample, n_candidate_clusters: int,
             reference: Sequence[float] | None) -> Evaluation:
    """The agreement of one window, and the candidate's drift against `reference` (its
    training proportions, one per label; None: no drift figures)."""
    n = int(sample.reading_ids.size)
    if n == 0:
        raise ValueError("an empty window has no agreement")
    ari = adjusted_rand_index(sample.active_ids, sample.candidate_ids)
    same = float(np.count_nonzero(sample.active_ids == sample.candidate_ids)) / n
    score = p_value = None
    if reference is not None and len(reference) == n_candidate_clusters:
        counts = np.bincount(sample.candidate_labels, minlength=n_candidate_clusters)
        if counts.size == n_candidate_clusters:
            score = js_divergence(counts, reference)
            p_value = g_test_p_value(counts, reference)
    return Evaluation(
        readings=n, adjusted_rand_index=ari, same_id_share=same, candidate_drift_score=score,
        candidate_p_value=p_value, first_reading_id=int(sample.reading_ids.min()),
        last_reading_id=int(sample.reading_ids.max()))
