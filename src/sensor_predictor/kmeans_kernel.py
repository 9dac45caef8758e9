"""StandardScaler + KMeans prediction with numpy alone: no scikit-learn at serving time.

A fitted scaler and KMeans are four arrays: the scaler's mean_ and scale_, the centres, and (for
the old trainer's episode models) which input column fills each model column. Predicting is
`(x - mean) / scale`, then the nearest centre. The labels are computed the way scikit-learn's
KMeans.predict computes them (argmin over `||c||^2 - 2 x.c`, first minimum on ties), so they
are the same labels; measured 0.04 ms against 0.64 ms per 100-row batch through the Pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

Matrix = npt.NDArray[np.float64]


@dataclass(frozen=True, eq=False)
class KMeansKernel:
    mean: Matrix
    """(p,) subtracted from each model column (zeros for a scaler without centring)."""
    scale: Matrix
    """(p,) each centred column is divided by this (ones for a scaler without scaling)."""
    centers: Matrix
    """(k, p) the cluster centres, in scaled space."""
    columns: tuple[int, ...] | None = None
    """For each of the p model columns, the input column it copies, or -1 for 0. None: the
    input is the model's columns as they are."""
    n_inputs: int = 0
    """Input columns (the features read from each reading)."""
    _centers_sq: Matrix = field(init=False, repr=False)
    _centers_t: Matrix = field(init=False, repr=False)
    _src: npt.NDArray[np.intp] = field(init=False, repr=False)
    _dst: npt.NDArray[np.intp] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        mean = np.ascontiguousarray(self.mean, dtype=np.float64)
        scale = np.ascontiguousarray(self.scale, dtype=np.float64)
        centers = np.ascontiguousarray(self.centers, dtype=np.float64)
        if centers.ndim != 2 or centers.shape[0] < 1:
            raise ValueError(f"centres must be a (k, p) matrix, got shape {centers.shape}")
        p = centers.shape[1]
        if mean.shape != (p,) or scale.shape != (p,):
            raise ValueError(f"mean {mean.shape} and scale {scale.shape} must be ({p},)")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(scale))
                and np.all(np.isfinite(centers)) and np.all(scale != 0)):
            raise ValueError("the scaler and centres must be finite, the scale non-zero")
        n_inputs = p
        src: list[int] = []
        dst: list[int] = []
        if self.columns is not None:
            if len(self.columns) != p:
                raise ValueError(f"{len(self.columns)} column sources for {p} model columns")
            n_inputs = self.n_inputs
            if any(not -1 <= c < n_inputs for c in self.columns):
                raise ValueError(f"a column source is outside 0..{n_inputs - 1}")
            for d, c in enumerate(self.columns):
                if c >= 0:
                    dst.append(d)
                    src.append(c)
        set_ = object.__setattr__
        set_(self, "mean", mean)
        set_(self, "scale", scale)
        set_(self, "centers", centers)
        set_(self, "n_inputs", int(n_inputs))
        set_(self, "_centers_sq", np.einsum("ij,ij->i", centers, centers))
        set_(self, "_centers_t", np.ascontiguousarray(centers.T))
        set_(self, "_src", np.asarray(src, dtype=np.intp))
        set_(self, "_dst", np.asarray(dst, dtype=np.intp))

    @property
    def n_clusters(self) -> int:
        return int(self.centers.shape[0])

    @property
    def n_features(self) -> int:
        """The model's own columns (81 for an episode model of 20 sensors)."""
        return int(self.centers.shape[1])

    def model_input(self, matrix: Matrix) -> Matrix:
        """The model's columns for input rows (the episode vector of each reading)."""
        if self.columns is None:
            return matrix
        out = np.zeros((matrix.shape[0], self.n_features), dtype=np.float64)
        out[:, self._dst] = matrix[:, self._src]
        return out

    def predict(self, matrix: Matrix) -> tuple[npt.NDArray[np.int64], Matrix | None]:
        """Cluster ids, and per row 1 - nearest / second-nearest centre distance (None with a
        single cluster)."""
        labels, confidence, _ = self.predict_with_distance(matrix)
        return labels, confidence

    def predict_with_distance(self, matrix: Matrix
                              ) -> tuple[npt.NDArray[np.int64], Matrix | None, Matrix]:
        """predict(), and per row the distance to the nearest centre in scaled space (what the
        outlier share compares with the training distances): free, from the same products."""
        if matrix.shape[0] == 0:
            empty = np.empty(0, dtype=np.float64)
            return np.empty(0, dtype=np.int64), empty, empty
        if matrix.ndim != 2 or matrix.shape[1] != self.n_inputs:
            raise ValueError(f"expected {self.n_inputs} columns, got shape {matrix.shape}")
        z = (self.model_input(np.asarray(matrix, dtype=np.float64)) - self.mean) / self.scale
        # scikit-learn's own argmin quantity (see _k_means_lloyd.pyx): ||c||^2 - 2 x.c
        partial = self._centers_sq - 2.0 * (z @ self._centers_t)
        labels = np.argmin(partial, axis=1).astype(np.int64)
        squared = np.maximum(partial + np.einsum("ij,ij->i", z, z)[:, None], 0.0)
        if self.n_clusters < 2:
            return labels, None, np.sqrt(squared[:, 0])
        two = np.sqrt(np.partition(squared, 1, axis=1)[:, :2])
        with np.errstate(divide="ignore", invalid="ignore"):
            confidence = np.where(two[:, 1] > 0, 1.0 - two[:, 0] / two[:, 1], 1.0)
        return labels, confidence, two[:, 0]

    def to_arrays(self) -> dict[str, Any]:
        """Plain lists and numbers (JSON): what the local model cache stores."""
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "centers": self.centers.tolist(),
                "columns": None if self.columns is None else list(self.columns),
                "n_inputs": self.n_inputs}

    @classmethod
    def from_arrays(cls, data: dict[str, Any]) -> KMeansKernel:
        columns = data.get("columns")
        return cls(np.asarray(data["mean"], dtype=np.float64),
                   np.asarray(data["scale"], dtype=np.float64),
                   np.asarray(data["centers"], dtype=np.float64),
                   None if columns is None else tuple(int(c) for c in columns),
                   int(data.get("n_inputs", 0)))


def from_parts(scaler: Any, kmeans: Any, columns: tuple[int, ...] | None = None,
               n_inputs: int = 0) -> KMeansKernel | None:
    """The kernel of a fitted StandardScaler and KMeans (scikit-learn objects, already imported
    by whoever unpickled them); None when they are not exactly that, and then the caller predicts
    through scikit-learn."""
    from sklearn.cluster import KMeans
    from sklearn.preprocessing import StandardScaler

    if type(scaler) is not StandardScaler or type(kmeans) is not KMeans:
        return None  # a subclass may predict differently
    centers = getattr(kmeans, "cluster_centers_", None)
    n_features = getattr(scaler, "n_features_in_", None)
    if centers is None or n_features is None:
        return None
    centers = np.asarray(centers)
    if centers.dtype != np.float64 or centers.ndim != 2 or centers.shape[1] != n_features:
        return None  # a float32 fit predicts in float32: leave that to scikit-learn
    mean = scaler.mean_ if scaler.with_mean else None
    scale = scaler.scale_ if scaler.with_std else None
    try:
        return KMeansKernel(
            np.zeros(n_features) if mean is None else np.asarray(mean, dtype=np.float64),
            np.ones(n_features) if scale is None else np.asarray(scale, dtype=np.float64),
            centers, columns, n_inputs)
    except ValueError:
        return None


def from_pipeline(pipeline: Any) -> KMeansKernel | None:
    """The kernel of a Pipeline([StandardScaler, KMeans]); None for anything else."""
    from sklearn.pipeline import Pipeline

    if type(pipeline) is not Pipeline or len(pipeline.steps) != 2:
        return None
    (_, scaler), (_, kmeans) = pipeline.steps
    return from_parts(scaler, kmeans)
