"""Per-feature drift and outlier share over the cluster tracker's sliding window. Pure: numpy.

The reference travels with the model (`FeatureReference`): per input feature, the training mean
and standard deviation, and the training distribution of the distance from a reading to its
nearest centre (its 99th and 99.9th percentiles). `sensor-predictor train` logs it in the model's
metadata; for a model without it, the means and deviations are the fitted StandardScaler's
(`mean_`, `scale_`: the population moments of the training columns), and the distance
percentiles are unknown, so outliers are not tracked for that model.

Per feature, the window mean is compared with the training mean: the effect is
(window mean - training mean) / training standard deviation (in standard deviations of a
reading), its z-score is effect x sqrt(n) and the p-value two-sided normal. A feature drifts
when |effect| > `effect_threshold` and its p-value is below the Bonferroni share of the false
alarm budget: FALSE_ALARM_BUDGET / features. The budget is per check, and a check happens at
most once per reading (a batch of one), so by the union bound a stationary stream opens at most
FALSE_ALARM_BUDGET events per reading from all features together.

Outliers: the share of the window whose nearest-centre distance exceeds the training 99th
percentile, with the binomial upper tail P(X >= outliers | n, 1 %) as its p-value; the share
drifts when it exceeds `share_threshold` and its p-value is below FALSE_ALARM_BUDGET.

Every update is O(batch x features) numpy (the rows entering and leaving the window), whatever
the window.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "FALSE_ALARM_BUDGET",
    "OUTLIER_QUANTILE",
    "ExcursionState",
    "FeatureDriftTracker",
    "FeatureRank",
    "FeatureReference",
    "OutlierTracker",
    "binomial_tail",
    "reference_from_kernel",
    "reference_from_training",
]

FALSE_ALARM_BUDGET = 1e-7
"""Expected false events per stationary reading, per rule (features together; outliers)."""
OUTLIER_QUANTILE = 0.99
"""A reading is an outlier beyond this quantile of the training distances."""
OUTLIER_SHARE = 1.0 - OUTLIER_QUANTILE
TOP_FEATURES = 5
"""How many features a drift row names."""

Matrix = npt.NDArray[np.float64]


@dataclass(frozen=True)
class FeatureReference:
    """What the training data looked like, per input feature, and how far it lay from the
    centres."""

    names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    distance_p99: float | None = None
    distance_p999: float | None = None
    source: str = "training"
    """"training": logged by `train`; "scaler": derived from the fitted StandardScaler."""
    inflation: tuple[tuple[int, tuple[float, ...]], ...] = ()
    """Per window size, per feature: the variance of the mean of that many consecutive
    training readings over the iid value std^2 / window (the design effect of the stream's
    autocorrelation; 1 for independent readings). Empty: taken as 1."""
    outlier_inflation: tuple[tuple[int, float], ...] = ()
    """The same for the count of readings beyond distance_p99 (their episodes come in runs)."""

    def __post_init__(self) -> None:
        p = len(self.names)
        if p == 0 or len(self.mean) != p or len(self.std) != p:
            raise ValueError(f"{p} names, {len(self.mean)} means, {len(self.std)} deviations")
        if not all(math.isfinite(m) for m in self.mean) or not all(
                math.isfinite(s) and s > 0 for s in self.std):
            raise ValueError("means must be finite and deviations finite and positive")
        for q in (self.distance_p99, self.distance_p999):
            if q is not None and not (math.isfinite(q) and q > 0):
                raise ValueError(f"a distance percentile must be finite and positive, got {q}")
        for w, factors in self.inflation:
            if w < 1 or len(factors) != p or not all(
                    math.isfinite(f) and f > 0 for f in factors):
                raise ValueError(f"inflation at window {w}: {len(factors)} factors for {p}")

    def outlier_inflation_at(self, window: int) -> float:
        """The outlier count's design effect at `window` (nearest stored), at least 1."""
        if not self.outlier_inflation:
            return 1.0
        _, factor = min(self.outlier_inflation, key=lambda e: abs(math.log(e[0] / window)))
        return max(1.0, factor)

    def inflation_at(self, window: int) -> tuple[float, ...]:
        """The design effect per feature at `window`: the stored window nearest to it (in
        ratio), at least 1; all 1 when none is stored."""
        if not self.inflation:
            return (1.0,) * len(self.names)
        _, factors = min(self.inflation, key=lambda e: abs(math.log(e[0] / window)))
        return tuple(max(1.0, f) for f in factors)

    def to_json(self) -> dict[str, Any]:
        return {"names": list(self.names), "mean": list(self.mean), "std": list(self.std),
                "distance_p99": self.distance_p99, "distance_p999": self.distance_p999,
                "source": self.source,
                "inflation": {str(w): list(f) for w, f in self.inflation},
                "outlier_inflation": {str(w): f for w, f in self.outlier_inflation}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FeatureReference:
        def opt(v: Any) -> float | None:
            return None if v is None else float(v)

        return cls(tuple(str(n) for n in data["names"]),
                   tuple(float(m) for m in data["mean"]),
                   tuple(float(s) for s in data["std"]),
                   opt(data.get("distance_p99")), opt(data.get("distance_p999")),
                   str(data.get("source", "training")),
                   tuple(sorted((int(w), tuple(float(x) for x in f))
                                for w, f in (data.get("inflation") or {}).items())),
                   tuple(sorted((int(w), float(f))
                                for w, f in (data.get("outlier_inflation") or {}).items())))


def reference_from_training(names: Sequence[str], matrix: Matrix, distances: Matrix
                            ) -> FeatureReference:
    """The reference `train` logs: the training matrix's column moments (population deviation,
    as StandardScaler's scale_) and its nearest-centre distances' 99th and 99.9th percentiles."""
    std = matrix.std(axis=0)
    std = np.where(std > 0, std, 1.0)  # a constant column: any change is drift, any unit will do
    p99, p999 = np.quantile(distances, [0.99, 0.999])
    beyond = (np.asarray(distances) > p99).astype(np.float64).reshape(-1, 1)
    outlier = design_effects(beyond, np.array([math.sqrt(OUTLIER_SHARE * (1 - OUTLIER_SHARE))]))
    return FeatureReference(tuple(names), tuple(matrix.mean(axis=0).tolist()),
                            tuple(std.tolist()),
                            float(p99) if p99 > 0 else None, float(p999) if p999 > 0 else None,
                            inflation=design_effects(matrix, std),
                            outlier_inflation=tuple((w, f[0]) for w, f in outlier))


INFLATION_WINDOWS = (10, 20, 50, 100, 200, 500, 1000)
MIN_BLOCKS = 20


def design_effects(matrix: Matrix, std: Matrix) -> tuple[tuple[int, tuple[float, ...]], ...]:
    """Batch means: for each window w with at least MIN_BLOCKS blocks of w consecutive rows
    (the matrix in stream order), var(block means) x w / std^2 per feature, at its upper
    99.9 % confidence bound (a chi-square with blocks - 1 degrees of freedom): a few blocks
    underestimate a stream's rare episodes, and an underestimate is a false alarm."""
    from scipy.special import chdtri

    out = []
    n = matrix.shape[0]
    for w in INFLATION_WINDOWS:
        blocks = n // w
        if blocks < MIN_BLOCKS:
            break
        means = matrix[: blocks * w].reshape(blocks, w, -1).mean(axis=1)
        upper = (blocks - 1) / float(chdtri(blocks - 1, 0.999))
        factors = means.var(axis=0, ddof=1) * w / std ** 2 * upper
        out.append((w, tuple(float(f) for f in factors)))
    return tuple(out)


def reference_from_kernel(names: Sequence[str], mean: Matrix, scale: Matrix,
                          columns: Sequence[int] | None = None,
                          model_features: Sequence[str] = ()) -> FeatureReference:
    """The reference of a model that carries none: the scaler's mean_ and scale_ per input
    feature. With `columns` (the old trainer's episode models), input feature c takes the model
    column that copies it, its `_mean` column first. No distance percentiles."""
    n = len(names)
    if columns is None:
        src = list(range(n))
    else:
        src = []
        for c in range(n):
            cands = [d for d, s in enumerate(columns) if s == c]
            if not cands:
                raise ValueError(f"no model column copies input feature {names[c]!r}")
            named = [d for d in cands if d < len(model_features)
                     and model_features[d].endswith("_mean")]
            src.append((named or cands)[0])
    return FeatureReference(tuple(names), tuple(float(mean[d]) for d in src),
                            tuple(float(abs(scale[d])) for d in src), source="scaler")


def _normal_two_sided(z: Matrix) -> Matrix:
    from scipy.special import ndtr

    return np.asarray(2.0 * ndtr(-np.abs(z)), dtype=np.float64)


def binomial_tail(k: float, n: float, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), continued to real k and n (the regularised incomplete
    beta I_p(k, n - k + 1)): an overdispersed count is tested as k / d out of n / d."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    from scipy.special import betainc

    return float(betainc(k, n - k + 1, p))


class _Ring:
    """The last `window` rows of a (rows, width) stream, with their column sums."""

    def __init__(self, window: int, width: int) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.buf: Matrix = np.zeros((window, width), dtype=np.float64)
        self.sums: Matrix = np.zeros(width, dtype=np.float64)
        self.pos = 0
        self.fill = 0
        self._pushed = 0

    def push(self, rows: Matrix) -> None:
        k = rows.shape[0]
        w = self.window
        if k == 0:
            return
        if k >= w:
            self.buf[:] = rows[k - w:]
            self.pos, self.fill = 0, w
            self.sums = self.buf.sum(axis=0)
            self._pushed = 0
            return
        idx = (self.pos + np.arange(k)) % w
        if self.fill + k > w:
            n_leave = self.fill + k - w
            oldest = (self.pos - self.fill + np.arange(n_leave)) % w
            self.sums -= self.buf[oldest].sum(axis=0)
        self.buf[idx] = rows
        self.sums += rows.sum(axis=0)
        self.pos = (self.pos + k) % w
        self.fill = min(w, self.fill + k)
        self._pushed += k
        if self._pushed >= 64 * w:  # running sums drift by rounding: re-add now and then
            self.sums = self.buf[: self.fill].sum(axis=0) if self.fill < w \
                else self.buf.sum(axis=0)
            self._pushed = 0


@dataclass(frozen=True)
class FeatureRank:
    """One feature's standing in the window: what a drift row lists."""

    feature: str
    effect: float
    """(window mean - training mean) / training standard deviation."""
    z: float
    p_value: float
    window_mean: float
    reference_mean: float

    def to_json(self) -> dict[str, Any]:
        return {"feature": self.feature, "effect": round(self.effect, 4),
                "z": round(self.z, 3), "p_value": self.p_value,
                "window_mean": self.window_mean, "reference_mean": self.reference_mean}


@dataclass(frozen=True)
class FeatureState:
    scores: Matrix
    """|effect| per feature (the sensor_feature_drift_score gauge)."""
    p_values: Matrix
    drifting: bool
    """Some feature passes both the effect and the significance rule."""
    holding: bool
    """Some feature's |effect| is still at or above the exit level."""
    ranked: tuple[FeatureRank, ...]
    """The TOP_FEATURES features with the largest |z|, largest first."""


class FeatureDriftTracker:
    """Window mean per feature against the reference, over a sliding window."""

    def __init__(self, reference: FeatureReference, window: int, effect_threshold: float = 0.5,
                 exit_ratio: float = 0.75, budget: float = FALSE_ALARM_BUDGET) -> None:
        if effect_threshold <= 0:
            raise ValueError(f"effect_threshold must be > 0, got {effect_threshold}")
        if not 0 < budget < 1:
            raise ValueError(f"budget must be in (0, 1), got {budget}")
        self.reference = reference
        self.names = reference.names
        self._mean = np.asarray(reference.mean, dtype=np.float64)
        self._std = np.asarray(reference.std, dtype=np.float64)
        self._ring = _Ring(window, len(reference.names))
        # The window mean's deviation is std x sqrt(inflation / n), not std / sqrt(n), when
        # consecutive readings are correlated (a machine's sensors move slowly).
        self._inflation = np.asarray(reference.inflation_at(window), dtype=np.float64)
        self.effect_threshold = float(effect_threshold)
        self.exit_level = float(effect_threshold) * float(exit_ratio)
        self.alpha = float(budget) / len(reference.names)
        """The per-feature significance level (Bonferroni)."""

    @property
    def window(self) -> int:
        return self._ring.window

    @property
    def window_full(self) -> bool:
        return self._ring.fill == self._ring.window

    def update(self, matrix: Matrix) -> FeatureState | None:
        """Add a batch's feature rows (stream order); the state once the window is full."""
        m = np.asarray(matrix, dtype=np.float64)
        if m.ndim != 2 or m.shape[1] != len(self.names):
            raise ValueError(f"expected {len(self.names)} columns, got shape {m.shape}")
        self._ring.push(m)
        if not self.window_full:
            return None
        return self.state()

    def state(self) -> FeatureState:
        n = self._ring.fill
        window_mean = self._ring.sums / n
        effect = (window_mean - self._mean) / self._std
        z = effect * np.sqrt(n / self._inflation)
        p = _normal_two_sided(z)
        scores = np.abs(effect)
        drifting = bool(np.any((scores > self.effect_threshold) & (p < self.alpha)))
        holding = bool(np.any(scores >= self.exit_level))
        top = np.argsort(-np.abs(z), kind="stable")[:TOP_FEATURES]
        ranked = tuple(FeatureRank(self.names[i], float(effect[i]), float(z[i]), float(p[i]),
                                   float(window_mean[i]), float(self._mean[i])) for i in top)
        return FeatureState(scores, p, drifting, holding, ranked)


@dataclass(frozen=True)
class OutlierState:
    share: float
    p_value: float
    drifting: bool
    holding: bool


class OutlierTracker:
    """Share of the window beyond the training distances' 99th percentile."""

    def __init__(self, threshold_distance: float, window: int, share_threshold: float = 0.05,
                 exit_ratio: float = 0.75, budget: float = FALSE_ALARM_BUDGET,
                 inflation: float = 1.0) -> None:
        if not threshold_distance > 0:
            raise ValueError(f"threshold_distance must be > 0, got {threshold_distance}")
        self.threshold_distance = float(threshold_distance)
        self._ring = _Ring(window, 1)
        self.share_threshold = float(share_threshold)
        self.exit_level = float(share_threshold) * float(exit_ratio)
        self.alpha = float(budget)
        self.inflation = max(1.0, float(inflation))
        """The count's design effect: k outliers of n weigh as k / inflation of n / inflation."""

    @property
    def window_full(self) -> bool:
        return self._ring.fill == self._ring.window

    def update(self, distances: Matrix) -> OutlierState | None:
        d = np.asarray(distances, dtype=np.float64).reshape(-1, 1)
        self._ring.push((d > self.threshold_distance).astype(np.float64))
        if not self.window_full:
            return None
        n = self._ring.fill
        k = round(float(self._ring.sums[0]))
        share = k / n
        p = binomial_tail(k / self.inflation, n / self.inflation, OUTLIER_SHARE)
        return OutlierState(share, p, share > self.share_threshold and p < self.alpha,
                            share >= self.exit_level)


Kind = Literal["cluster", "feature", "outlier"]
Event = Literal["started", "ongoing", "ended"]
KINDS: tuple[Kind, ...] = ("cluster", "feature", "outlier")
"""The rules, in the order that names an excursion two of them open at once."""


class ExcursionState:
    """One excursion per model, whatever opens it: it opens when any rule fires (the first
    of cluster, feature, outlier names its kind) and ends when every rule is back under its
    exit level."""

    def __init__(self, in_excursion: bool = False) -> None:
        self.open = bool(in_excursion)
        self.kind: Kind | None = None

    def step(self, fired: Mapping[Kind, bool], holding: Mapping[Kind, bool]
             ) -> tuple[Event | None, Kind | None]:
        if not self.open:
            for rule in KINDS:
                if fired.get(rule, False):
                    self.open, self.kind = True, rule
                    return "started", rule
            return None, None
        if any(holding.values()):
            return "ongoing", self.kind
        self.open = False
        ended, self.kind = self.kind, None
        return "ended", ended
