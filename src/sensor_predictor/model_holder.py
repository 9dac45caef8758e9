"""The model being served: loaded from MLflow off the event loop, verified, swapped atomically."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import numpy as np
import numpy.typing as npt
import structlog

from sensor_predictor import db
from sensor_predictor.model_contract import (
    FEATURES_KEY,
    MODEL_ARTIFACT,
    PROPORTIONS_KEY,
    version_label,
)

log = structlog.get_logger("sensor_predictor.model_holder")

# How many recent readings the feature check samples, and the share that must carry every
# feature the model needs (the rest may be bad readings, which happen).
FEATURE_CHECK_SAMPLE = 100
FEATURE_CHECK_MIN_SHARE = 0.5


class ModelLoadError(Exception):
    """A model could not be served; `reason` is a stable metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


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
class LoadedModel:
    row: ActiveRow
    model_name: str
    feature_names: tuple[str, ...]
    n_clusters: int
    reference: tuple[float, ...] | None
    pipeline: Any = field(repr=False)
    read_query: str = field(repr=False)

    @property
    def version(self) -> str:
        return self.row.model_version

    @property
    def run_id(self) -> str:
        return self.row.run_id

    def predict(
        self, matrix: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64] | None]:
        """Cluster ids and a confidence per row (1 - nearest / second-nearest centre distance)."""
        if matrix.shape[0] == 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
        if hasattr(self.pipeline, "transform") and self.n_clusters >= 2:
            # One pass gives both: the distances to every centre, and their argmin.
            distances = np.asarray(self.pipeline.transform(matrix), dtype=np.float64)
            labels = np.argmin(distances, axis=1).astype(np.int64)
            two = np.partition(distances, 1, axis=1)[:, :2]
            with np.errstate(divide="ignore", invalid="ignore"):
                confidence = np.where(two[:, 1] > 0, 1.0 - two[:, 0] / two[:, 1], 1.0)
            return labels, confidence
        return np.asarray(self.pipeline.predict(matrix), dtype=np.int64), None


def load_and_verify(row: ActiveRow, model_name: str) -> LoadedModel:
    """Blocking: fetch the run's model from MLflow and check it can serve. Runs in a thread."""
    import mlflow  # imported here: ~2 s on first use, and only the worker's thread pays it

    uri = f"runs:/{row.run_id}/{MODEL_ARTIFACT}"
    try:
        info = mlflow.models.get_model_info(uri)
        pipeline = mlflow.sklearn.load_model(uri)
    except Exception as exc:
        raise ModelLoadError(_mlflow_reason(exc),
                             f"cannot load {uri} from MLflow: {_first_line(exc)}") from exc
    metadata = info.metadata or {}
    names = metadata.get(FEATURES_KEY)
    if (not isinstance(names, list) or not names
            or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names)):
        raise ModelLoadError(
            "no_feature_names",
            f"{uri} carries no ordered feature names (metadata {FEATURES_KEY!r}); "
            "train it with `sensor-predictor train` or log that metadata")
    n_in = getattr(pipeline, "n_features_in_", len(names))
    if n_in != len(names):
        raise ModelLoadError(
            "feature_mismatch",
            f"{uri} was fitted on {n_in} features but names {len(names)}")
    n_clusters = _cluster_count(pipeline)
    if row.n_clusters is not None and n_clusters is not None and row.n_clusters != n_clusters:
        raise ModelLoadError(
            "cluster_mismatch",
            f"clusters row {row.id} says {row.n_clusters} clusters, the model has {n_clusters}")
    reference = metadata.get(PROPORTIONS_KEY)
    if reference is not None and (not isinstance(reference, list)
                                  or len(reference) != n_clusters):
        reference = None  # unusable; the drift tracker falls back to the first full window
    model = LoadedModel(
        row=row, model_name=model_name, feature_names=tuple(names),
        n_clusters=int(n_clusters or row.n_clusters or 1),
        reference=tuple(float(p) for p in reference) if reference else None,
        pipeline=pipeline, read_query=db.read_range_query(names))
    try:
        labels, _ = model.predict(np.zeros((1, len(names)), dtype=np.float64))
    except Exception as exc:
        raise ModelLoadError("probe_failed",
                             f"{uri} fails on a probe row: {_first_line(exc)}") from exc
    if not 0 <= int(labels[0]) < model.n_clusters:
        raise ModelLoadError("probe_failed",
                             f"{uri} predicts cluster {int(labels[0])} for a probe row")
    return model


def _cluster_count(pipeline: Any) -> int | None:
    final = pipeline.steps[-1][1] if hasattr(pipeline, "steps") else pipeline
    centers = getattr(final, "cluster_centers_", None)
    if centers is not None:
        return len(centers)
    n = getattr(final, "n_clusters", None)
    return int(n) if isinstance(n, int) else None


def _mlflow_reason(exc: Exception) -> str:
    text = f"{type(exc).__name__} {exc}".lower()
    if any(word in text for word in ("connection", "max retries", "timed out", "unreachable")):
        return "mlflow_unreachable"
    if any(word in text for word in ("not found", "does not exist", "no such file",
                                      "resource_does_not_exist")):
        return "not_found"
    return "load_failed"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


async def _check_features_in_readings(pool: asyncpg.Pool, names: Sequence[str]) -> None:
    """Refuse a model whose features the readings do not carry: it could score nothing."""
    rows = await pool.fetch(
        'SELECT "values" ?& $1::text[] AS has_all FROM readings'
        " WHERE jsonb_typeof(\"values\") = 'object' ORDER BY id DESC LIMIT $2",
        list(names), FEATURE_CHECK_SAMPLE)
    if not rows:
        return
    share = sum(1 for r in rows if r["has_all"]) / len(rows)
    if share < FEATURE_CHECK_MIN_SHARE:
        raise ModelLoadError(
            "feature_mismatch",
            f"only {share:.0%} of the latest {len(rows)} readings carry every feature the "
            f"model needs ({', '.join(names[:3])}...)")


class ModelHolder:
    """Holds the served model; `refresh` follows the clusters table, with backoff on failure."""

    def __init__(self, model_name: str, *, on_failure: Any = None) -> None:
        self.model_name = model_name
        self.current: LoadedModel | None = None
        self._lock = asyncio.Lock()
        self._failed_row: ActiveRow | None = None
        self._failures = 0
        self.retry_at: float | None = None  # monotonic time of the next attempt after a failure
        self._on_failure = on_failure

    async def active_row(self, pool: asyncpg.Pool) -> ActiveRow | None:
        r = await pool.fetchrow(db.queries()["active_model"])
        if r is None:
            return None
        return ActiveRow(int(r["id"]), r["mlflow_run_id"], r["mlflow_model_version"],
                         r["n_clusters"])

    async def refresh(self, pool: asyncpg.Pool) -> bool:
        """Serve the newest active row's model if it is not served yet; True when swapped."""
        async with self._lock:
            row = await self.active_row(pool)
            current_row = self.current.row if self.current else None
            if row == current_row:
                self.retry_at = None
                return False
            if row is None:
                log.warning("model_deactivated", previous_version=self.current.version
                            if self.current else None,
                            note="no clusters row is active: scoring pauses, readings wait")
                self.current = None
                return True
            if row == self._failed_row and self.retry_at is not None \
                    and time.monotonic() < self.retry_at:
                return False
            started = time.perf_counter()
            try:
                model = await asyncio.to_thread(load_and_verify, row, self.model_name)
                await _check_features_in_readings(pool, model.feature_names)
            except ModelLoadError as exc:
                self._record_failure(row, exc.reason, str(exc))
                return False
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                raise  # the database went away: the caller retries like any database error
            except Exception as exc:  # a bug in a model's own code must not stop the worker
                self._record_failure(row, "load_failed", f"{type(exc).__name__}: {exc}")
                return False
            previous = self.current
            self.current = model
            self._failed_row, self._failures, self.retry_at = None, 0, None
            log.info("model_swapped", model_version=model.version, run_id=model.run_id,
                     clusters_row=row.id, n_clusters=model.n_clusters,
                     features=len(model.feature_names),
                     previous_version=previous.version if previous else None,
                     load_ms=round((time.perf_counter() - started) * 1000, 1))
            try:
                await pool.execute(db.queries()["mark_versions_processed"], row.run_id)
            except asyncpg.PostgresError as exc:  # bookkeeping for old tools; never fatal
                log.warning("versions_not_marked", error=str(exc))
            return True

    def _record_failure(self, row: ActiveRow, reason: str, message: str) -> None:
        self._failures = self._failures + 1 if row == self._failed_row else 1
        self._failed_row = row
        delay = min(60.0, 1.0 * 2 ** (self._failures - 1))
        self.retry_at = time.monotonic() + delay
        log.error("model_load_failed", reason=reason, error=message, run_id=row.run_id,
                  clusters_row=row.id, attempt=self._failures, retry_in_s=delay,
                  serving=self.current.version if self.current else None)
        if self._on_failure is not None:
            self._on_failure(reason)


def configure_mlflow(tracking_uri: str) -> None:
    """Point MLflow at the tracking server, failing fast rather than retrying for minutes."""
    # MLflow's defaults retry an unreachable server for minutes; a swap then hangs that long.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    # A worker has no business phoning a third party; an operator can still opt in.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
