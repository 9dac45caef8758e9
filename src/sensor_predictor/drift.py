"""Cluster-distribution drift: Jensen-Shannon divergence over a sliding window of readings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "DriftEvent",
    "DriftTracker",
    "DriftUpdate",
    "distribution_to_json",
    "g_test_p_value",
    "js_divergence",
]

DriftEvent = Literal["started", "ongoing", "ended"]

_FloatArray = npt.NDArray[np.float64]
_IntArray = npt.NDArray[np.intp]


def _as_distribution(values: npt.ArrayLike, name: str) -> _FloatArray:
    """Validate a non-negative 1-D vector with positive finite sum and return it normalised."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D vector, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must contain only finite values")
    if np.any(arr < 0):
        raise ValueError(f"{name} must be non-negative")
    total = float(arr.sum())
    if total <= 0:
        raise ValueError(f"{name} must have a positive sum")
    return arr / total


def _js_normalised(p: _FloatArray, q: _FloatArray) -> float:
    """Base-2 Jensen-Shannon divergence of two already-normalised distributions."""
    m = (p + q) / 2
    # Where p > 0, m >= p / 2 > 0, so the masked logs are finite; 0 * log 0 is taken as 0.
    pm = p > 0
    qm = q > 0
    kl_p = float(np.dot(p[pm], np.log2(p[pm] / m[pm])))
    kl_q = float(np.dot(q[qm], np.log2(q[qm] / m[qm])))
    js = (kl_p + kl_q) / 2
    # Only rounding can push it outside [0, 1]; base 2 bounds the true value.
    return min(max(js, 0.0), 1.0)


def js_divergence(p: npt.ArrayLike, q: npt.ArrayLike) -> float:
    """Return the base-2 Jensen-Shannon divergence (0..1) of two count or proportion vectors."""
    pn = _as_distribution(p, "p")
    qn = _as_distribution(q, "q")
    if pn.shape != qn.shape:
        raise ValueError(f"p and q must have the same length, got {pn.size} and {qn.size}")
    return _js_normalised(pn, qn)


def g_test_p_value(counts: npt.ArrayLike, reference: npt.ArrayLike) -> float:
    """How surprising the window's cluster counts are under the reference proportions: the
    p-value of the G-test (log-likelihood ratio, `scipy.stats.power_divergence` with
    lambda_="log-likelihood"), chi-square with (clusters the reference expects - 1) degrees of
    freedom. O(clusters). A count in a cluster the reference gives 0 is impossible under it:
    p = 0. Computed with scipy.special.chdtrc (what scipy.stats.chi2.sf calls), so the worker
    never imports scipy.stats (seconds)."""
    from scipy.special import chdtrc

    obs = np.asarray(counts, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    n = float(obs.sum())
    if n <= 0:
        return 1.0
    expected = ref / ref.sum() * n
    possible = expected > 0
    if np.any(obs[~possible] > 0):
        return 0.0
    o, e = obs[possible], expected[possible]
    df = int(possible.sum()) - 1
    if df < 1:
        return 1.0
    seen = o > 0
    g = 2.0 * float(np.dot(o[seen], np.log(o[seen] / e[seen])))
    return float(chdtrc(df, max(g, 0.0)))


def distribution_to_json(proportions: Sequence[float],
                         cluster_ids: Sequence[int] | None = None) -> dict[str, float]:
    """Return proportions (one per model label) as a JSON-friendly dict keyed by cluster id as
    a string: `cluster_ids[label]` (the stable ids) when given, else the label itself."""
    if cluster_ids is not None and len(cluster_ids) != len(proportions):
        raise ValueError(f"{len(proportions)} proportions but {len(cluster_ids)} cluster ids")
    keys = range(len(proportions)) if cluster_ids is None else cluster_ids
    return {str(int(k)): float(p) for k, p in zip(keys, proportions, strict=True)}


@dataclass(frozen=True, slots=True)
class DriftUpdate:
    """Outcome of feeding one batch of cluster ids to a DriftTracker."""

    score: float | None
    """JS divergence of the window against the reference; None until the window is full."""
    p_value: float | None
    """G-test p-value of the window's counts under the reference; None until the window is
    full."""
    event: DriftEvent | None
    """Transition caused by this update; "ongoing" while still at or above the exit level."""
    peak: float | None
    """Peak score of the current or just-ended excursion as seen by this tracker."""
    reference: tuple[float, ...] | None
    """Reference proportions; None until set (first full window when none was given)."""
    current: tuple[float, ...]
    """Window proportions after this update (all zero while the window is empty)."""
    window_fill: int
    """Readings in the window (at most the window size)."""


class DriftTracker:
    """Sliding-window cluster drift detector with hysteresis, for one model's lifetime."""

    def __init__(
        self,
        n_clusters: int,
        window: int,
        threshold: float,
        exit_threshold: float,
        reference: Sequence[float] | None = None,
        in_excursion: bool = False,
        p_value: float = 1.0,
    ) -> None:
        """Validate settings and start with an empty window.

        An excursion opens when the score exceeds `threshold` and the window's p-value under
        the reference is below `p_value` (1.0: no significance rule, the score alone)."""
        if n_clusters < 1:
            raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not 0.0 <= exit_threshold <= threshold <= 1.0:
            raise ValueError(
                "thresholds must satisfy 0 <= exit_threshold <= threshold <= 1, "
                f"got exit_threshold={exit_threshold}, threshold={threshold}"
            )
        if not 0.0 < p_value <= 1.0:
            raise ValueError(f"p_value must be in (0, 1], got {p_value}")
        self._p_threshold = float(p_value)
        self._p: float | None = None
        self._n = int(n_clusters)
        self._window = int(window)
        self._threshold = float(threshold)
        self._exit_threshold = float(exit_threshold)
        self._reference: _FloatArray | None = None
        if reference is not None:
            ref = _as_distribution(reference, "reference")
            if ref.size != self._n:
                raise ValueError(
                    f"reference must have n_clusters={self._n} entries, got {ref.size}"
                )
            self._reference = ref
        # Ring of the last `window` labels: what leaves the window must be known to
        # decrement its count without rescanning the window.
        self._buf: _IntArray = np.zeros(self._window, dtype=np.intp)
        self._pos = 0
        self._fill = 0
        self._counts: _IntArray = np.zeros(self._n, dtype=np.intp)
        self._score: float | None = None
        self._in_excursion = bool(in_excursion)
        self._peak: float | None = None

    @property
    def n_clusters(self) -> int:
        """Number of clusters the labels range over."""
        return self._n

    @property
    def window(self) -> int:
        """Window size in readings."""
        return self._window

    @property
    def score(self) -> float | None:
        """Score at the last update; None until the window is full."""
        return self._score

    @property
    def p_value(self) -> float | None:
        """G-test p-value at the last update; None until the window is full."""
        return self._p

    @property
    def window_full(self) -> bool:
        """Whether the window holds `window` readings."""
        return self._fill == self._window

    @property
    def window_fill(self) -> int:
        """Readings currently in the window."""
        return self._fill

    @property
    def in_excursion(self) -> bool:
        """Whether a drift excursion is open."""
        return self._in_excursion

    @property
    def peak(self) -> float | None:
        """Peak score of the open excursion as seen by this tracker, else None."""
        return self._peak if self._in_excursion else None

    @property
    def reference(self) -> tuple[float, ...] | None:
        """Reference proportions, or None until the first full window sets them."""
        return None if self._reference is None else tuple(self._reference.tolist())

    @property
    def counts(self) -> _IntArray:
        """Copy of the per-cluster counts of the window."""
        return self._counts.copy()

    def _validated(self, labels: npt.ArrayLike) -> _IntArray:
        """Return labels as a 1-D intp array, rejecting non-integers and out-of-range ids."""
        arr = np.asarray(labels)
        if arr.ndim != 1:
            raise ValueError(f"labels must be a 1-D array, got shape {arr.shape}")
        if arr.size == 0:
            return np.zeros(0, dtype=np.intp)
        if arr.dtype.kind not in "iu":
            raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self._n:
            raise ValueError(f"labels must be in [0, {self._n}), got values in [{lo}, {hi}]")
        return arr.astype(np.intp, copy=False)

    def _ring_slices(self, start: int, length: int) -> tuple[slice, slice]:
        """Return the (up to two) buffer slices covering `length` slots from `start`, wrapping."""
        end = start + length
        if end <= self._window:
            return slice(start, end), slice(0, 0)
        return slice(start, self._window), slice(0, end - self._window)

    def _push(self, labels: _IntArray) -> None:
        """Add labels to the window, evicting the oldest, in O(len(labels) + n_clusters)."""
        k = labels.size
        w = self._window
        if k == 0:
            return
        if k >= w:
            # Older readings of this batch would be evicted by its own tail anyway.
            tail = labels[k - w :]
            self._buf[:] = tail
            self._counts = np.bincount(tail, minlength=self._n)
            self._pos = 0
            self._fill = w
            return
        n_leave = self._fill + k - w
        if n_leave > 0:
            oldest = (self._pos - self._fill) % w
            for sl in self._ring_slices(oldest, n_leave):
                if sl.stop > sl.start:
                    self._counts -= np.bincount(self._buf[sl], minlength=self._n)
        first, second = self._ring_slices(self._pos, k)
        split = first.stop - first.start
        self._buf[first] = labels[:split]
        self._buf[second] = labels[split:]
        self._counts += np.bincount(labels, minlength=self._n)
        self._pos = (self._pos + k) % w
        self._fill = min(w, self._fill + k)

    def _current(self) -> _FloatArray:
        """Window proportions (zeros while empty)."""
        if self._fill == 0:
            return np.zeros(self._n, dtype=np.float64)
        return self._counts / self._fill

    def update(self, labels: npt.ArrayLike) -> DriftUpdate:
        """Add one batch of cluster ids (in stream order) and return the resulting drift state."""
        self._push(self._validated(labels))
        current = self._current()
        event: DriftEvent | None = None
        if self._fill == self._window:
            if self._reference is None:
                self._reference = current.copy()
            score = _js_normalised(self._reference, current)
            self._score = score
            # Once per batch, from the k counts: O(k) whatever the window.
            self._p = g_test_p_value(self._counts, self._reference)
            if not self._in_excursion:
                if score > self._threshold and (self._p_threshold >= 1.0
                                                or self._p < self._p_threshold):
                    event = "started"
                    self._in_excursion = True
                    self._peak = score
            elif score >= self._exit_threshold:
                event = "ongoing"
                self._peak = score if self._peak is None else max(self._peak, score)
            else:
                event = "ended"
                self._in_excursion = False
        peak = self._peak if (self._in_excursion or event == "ended") else None
        if event == "ended":
            self._peak = None
        return DriftUpdate(
            score=self._score,
            p_value=self._p,
            event=event,
            peak=peak,
            reference=None if self._reference is None else tuple(self._reference.tolist()),
            current=tuple(current.tolist()),
            window_fill=self._fill,
        )
