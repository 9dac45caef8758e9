"""What every side of model serving shares: the served model, the row naming it, why it failed.

model_holder.py (loading and swapping), legacy_model.py (the old trainer's layout) and
cluster_registry.py (stable ids) all import from here and none of them from another, so their
import graph has no cycle (tests/unit/test_imports.py keeps it so). Also here: the stable
reasons a load fails with (the `reason` label of sensor_model_load_failures_total) and the
small helpers both loaders use to report an MLflow failure.
"""

from __future__ import annotations

import contextlib
import typing
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import structlog

from sensor_predictor.feature_drift import FeatureReference
from sensor_predictor.kmeans_kernel import KMeansKernel
from sensor_predictor.model_contract import version_label

log = structlog.get_logger("sensor_predictor.model_holder")

LoadFailureReason = Literal["mlflow_unreachable", "not_found", "load_failed", "no_feature_names",
                            "feature_mismatch", "probe_failed", "source_not_allowed",
                            "bad_model_artifact", "artifacts_changed", "cluster_mapping_mismatch"]
LOAD_FAILURE_REASONS: tuple[LoadFailureReason, ...] = typing.get_args(LoadFailureReason)
"""Every reason a model load fails with, in the order the metric's series are created."""


class ModelLoadError(Exception):
    """A model could not be served; `reason` is a stable metric label."""

    def __init__(self, reason: LoadFailureReason, message: str) -> None:
        super().__init__(message)
        self.reason: LoadFailureReason = reason


@dataclass(frozen=True)
class ActiveRow:
    """The clusters row that names the model to serve."""

    id: int
    run_id: str
    registered_version: int | None
    n_clusters: int | None

    @property
    def model_version(self) -> str:
        """The model_version written with each prediction."""
        return version_label(self.run_id, self.registered_version)


@dataclass(frozen=True)
class Bookkeeping:
    """What the clusters row says about its model besides naming it."""

    n_clusters: int | None = None
    silhouette: float | None = None
    profiles: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class LoadedModel:
    row: ActiveRow
    model_name: str
    feature_names: tuple[str, ...]
    """The keys read from each reading's values, in the order predict() takes them."""
    n_clusters: int
    reference: tuple[float, ...] | None
    read_query: str = field(repr=False)
    pipeline: Any = field(default=None, repr=False)
    """The scikit-learn model, when it came from MLflow (None from the cache)."""
    kernel: KMeansKernel | None = field(default=None, repr=False)
    """The numpy predictor of a StandardScaler + KMeans; None: predict through `pipeline`."""
    legacy: bool = False
    """The old trainer's layout (an episode model)."""
    model_features: tuple[str, ...] = ()
    """The columns the model was fitted on (the 81 episode features of a legacy model)."""
    source: str = "mlflow"
    """Where it was loaded from: "mlflow" or "cache"."""
    unpickled: bool = False
    """Read by unpickling (a run without our JSON artifact, the old trainer's layout); False
    for our JSON artifact and the cache (json and numpy only)."""
    artifact_digest: str | None = field(default=None, compare=False)
    """sha256 of the artifacts it was read from (model_sources.digest_files); recorded when
    first served, compared on every later load."""
    stable_ids: npt.NDArray[np.int64] | None = field(default=None, repr=False, compare=False)
    """Label -> stable cluster id (cluster_registry.py), set before the model is first used;
    None: not aligned yet, the labels are written as they are."""
    feature_reference: FeatureReference | None = field(default=None, repr=False, compare=False)
    """Per feature, the training mean and deviation, and the training nearest-centre distance
    percentiles (feature_drift.py); None: no per-feature drift for this model."""

    @property
    def version(self) -> str:
        return self.row.model_version

    @property
    def run_id(self) -> str:
        return self.row.run_id

    def stable(self, labels: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """The stable cluster ids of the model's labels."""
        if self.stable_ids is None:
            return labels
        return self.stable_ids[labels]

    def predict(
        self, matrix: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64] | None]:
        """Cluster ids and a confidence per row (1 - nearest / second-nearest centre distance)."""
        labels, confidence, _ = self.predict_with_distance(matrix)
        return labels, confidence

    def predict_with_distance(
        self, matrix: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64] | None,
               npt.NDArray[np.float64] | None]:
        """predict(), and the distance of each row to its nearest centre in the model's scaled
        space (None when the model cannot say)."""
        if matrix.shape[0] == 0:
            empty = np.empty(0, dtype=np.float64)
            return np.empty(0, dtype=np.int64), empty, empty
        if self.kernel is not None:
            return self.kernel.predict_with_distance(matrix)
        if hasattr(self.pipeline, "transform") and self.n_clusters >= 2:
            # One pass gives both: the distances to every centre, and their argmin.
            distances = np.asarray(self.pipeline.transform(matrix), dtype=np.float64)
            labels = np.argmin(distances, axis=1).astype(np.int64)
            two = np.partition(distances, 1, axis=1)[:, :2]
            with np.errstate(divide="ignore", invalid="ignore"):
                confidence = np.where(two[:, 1] > 0, 1.0 - two[:, 0] / two[:, 1], 1.0)
            return labels, confidence, two[:, 0]
        return np.asarray(self.pipeline.predict(matrix), dtype=np.int64), None, None


def mlflow_module() -> Any:
    """MLflow, imported on first use (2-5 s with scikit-learn): only a fetch pays for it."""
    import mlflow

    return mlflow


def mlflow_reason(exc: Exception) -> LoadFailureReason:
    """The failure reason of an exception MLflow raised while fetching a model."""
    text = f"{type(exc).__name__} {exc}".lower()
    if any(word in text for word in ("connection", "max retries", "timed out", "unreachable")):
        return "mlflow_unreachable"
    if any(word in text for word in ("not found", "does not exist", "no such file",
                                      "resource_does_not_exist")):
        return "not_found"
    return "load_failed"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), else its type."""
    return first_line_text(str(exc)) or type(exc).__name__


def first_line_text(text: str) -> str:
    lines = text.strip().splitlines()
    return (lines[0] if lines else "")[:300]


@contextlib.contextmanager
def warnings_logged(row: ActiveRow) -> Iterator[None]:
    """Warnings raised while unpickling a model (say, scikit-learn's InconsistentVersionWarning
    for a model pickled by another version) are logged, not raised or printed."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        yield
    def text(w: warnings.WarningMessage) -> str:
        return f"{w.category.__name__}: {first_line_text(str(w.message))}"

    # The model's own (scikit-learn's) warnings concern the operator; MLflow's dependencies'
    # deprecation notices (SQLAlchemy, pydantic) do not.
    about_model = sorted({text(w) for w in seen if w.category.__module__.startswith("sklearn")})
    others = sorted({text(w) for w in seen} - set(about_model))
    if about_model:
        log.warning("model_load_warnings", run_id=row.run_id, warnings=about_model)
    if others:
        log.debug("model_load_library_warnings", run_id=row.run_id, warnings=others)
