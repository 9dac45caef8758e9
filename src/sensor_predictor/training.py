"""Train StandardScaler + KMeans on recent readings, log and register it in MLflow, activate it.

What is logged is the contract of model_contract.py, which model_holder.py loads: one sklearn
Pipeline (scaler, kmeans) under the run's "model" artifact, fitted on a float64 matrix whose
columns are the features in the order of the "feature_names" metadata, with the training cluster
proportions (the drift reference) in "training_cluster_proportions".
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg
import numpy as np
import numpy.typing as npt
import structlog

from sensor_predictor import db, features
from sensor_predictor.config import Settings
from sensor_predictor.feature_drift import reference_from_training
from sensor_predictor.model_contract import (
    FEATURE_NAMES,
    LEGACY_EXPERIMENT,
    MODEL_ARTIFACT,
    MODEL_JSON_ARTIFACT,
    model_metadata,
    version_label,
)
from sensor_predictor.simulator.generator import generate_feature_matrix

__all__ = [
    "EXPERIMENT_NAME",
    "PRODUCTION_ALIAS",
    "TrainResult",
    "activate_model",
    "fit_pipeline",
    "load_training_matrix",
    "train",
]

log = structlog.get_logger("sensor_predictor.training")

EXPERIMENT_NAME = LEGACY_EXPERIMENT  # the old trainer's experiment: one history
PRODUCTION_ALIAS = "production"
SILHOUETTE_SAMPLE = 5_000
KMEANS_N_INIT = 3  # k-means++ starts well; each extra start costs a full fit
# Serialises activations: two trainers activating at once must still leave one active row.
ACTIVATION_LOCK_KEY = 7_461_029_319

Source = Literal["database", "generated"]
Matrix = npt.NDArray[np.float64]
Profiles = dict[str, dict[str, float]]


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    run_id: str
    version: int
    n_readings: int
    source: Source
    silhouette: float
    proportions: tuple[float, ...]
    n_clusters: int
    profiles: Profiles
    activated: bool


@dataclass(frozen=True)
class FittedModel:
    """A fitted Pipeline and what it says about its training data."""

    pipeline: Any
    proportions: tuple[float, ...]
    silhouette: float
    profiles: Profiles
    feature_names: tuple[str, ...]
    """The matrix's columns, in order: what the metadata must name."""
    feature_reference: dict[str, Any] | None = None
    """Per feature, the training mean and deviation, and the nearest-centre distance
    percentiles (feature_drift.FeatureReference.to_json): the per-feature drift reference."""


async def load_training_matrix(
    conn: asyncpg.Connection, limit: int, feature_names: Sequence[str] = FEATURE_NAMES,
) -> Matrix:
    """The latest `limit` readings whose every feature is a finite number, as a float64 matrix.

    Parsed from the JSON text by feature name, never by jsonb key order, with the same rules
    the worker scores by (a reading it would refuse is not trained on).
    """
    rows = await conn.fetch(db.queries()["training_readings"], limit)
    # Parsing 50,000 JSON objects takes a second: off the event loop.
    _, matrix, bad = await asyncio.to_thread(
        features.parse_raw, [(r["id"], r["raw"]) for r in rows], feature_names)
    if bad:
        log.info("training_readings_skipped", skipped=len(bad),
                 reasons=sorted({b.reason for b in bad}))
    return matrix


def fit_pipeline(matrix: Matrix, clusters: int, seed: int,
                 feature_names: Sequence[str] = FEATURE_NAMES) -> FittedModel:
    """Blocking: fit StandardScaler + KMeans on `matrix`, whose columns are `feature_names` in
    that order, and describe the result."""
    names = tuple(feature_names)
    if matrix.ndim != 2 or matrix.shape[1] != len(names):
        raise ValueError(f"the matrix has {matrix.shape[-1]} columns, feature_names names "
                         f"{len(names)}")
    if len(set(names)) != len(names):
        raise ValueError("feature_names repeats a name")
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    pipeline = Pipeline([
        ("scaler", StandardScaler()),
        ("kmeans", KMeans(n_clusters=clusters, random_state=seed, n_init=KMEANS_N_INIT)),
    ])
    labels = np.asarray(pipeline.fit_predict(matrix), dtype=np.int64)
    counts = np.bincount(labels, minlength=clusters)
    proportions = tuple(float(c) for c in counts / counts.sum())
    scaled = pipeline.named_steps["scaler"].transform(matrix)
    # Quadratic in the rows: a sample keeps it to seconds.
    silhouette = float(silhouette_score(
        scaled, labels, sample_size=min(SILHOUETTE_SAMPLE, len(labels)), random_state=seed))
    centres = pipeline.named_steps["scaler"].inverse_transform(
        pipeline.named_steps["kmeans"].cluster_centers_)
    profiles = {str(i): {name: float(v) for name, v in zip(names, centre, strict=True)}
                for i, centre in enumerate(centres.tolist())}
    # The nearest-centre distance of every training row: the outlier share's reference.
    distances = pipeline.named_steps["kmeans"].transform(scaled).min(axis=1)
    feature_reference = reference_from_training(names, matrix, distances).to_json()
    return FittedModel(pipeline, proportions, silhouette, profiles, names, feature_reference)


def _fit_and_log(
    tracking_uri: str, model_name: str, experiment_name: str, matrix: Matrix, clusters: int,
    seed: int, source: Source, feature_names: Sequence[str] = FEATURE_NAMES,
) -> tuple[str, int, FittedModel]:
    """Blocking (runs in a thread): fit, log the run, register the version, move the alias."""
    import mlflow
    import sklearn
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.get_experiment_by_name(experiment_name)
    experiment_id = (experiment.experiment_id if experiment is not None
                     else mlflow.create_experiment(experiment_name))
    started = time.perf_counter()
    fitted = fit_pipeline(matrix, clusters, seed, feature_names)
    fit_seconds = time.perf_counter() - started
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_params({"n_clusters": clusters, "n_readings": int(matrix.shape[0]),
                           "source": source, "seed": seed})
        mlflow.log_metric("silhouette_score", fitted.silhouette)
        sample = matrix[:5]
        info = mlflow.sklearn.log_model(
            fitted.pipeline,
            name=MODEL_ARTIFACT,
            registered_model_name=model_name,
            signature=infer_signature(sample, fitted.pipeline.predict(sample)),
            # Explicit: inferring them picks up whatever the interpreter has loaded (pytest...).
            pip_requirements=[f"scikit-learn=={sklearn.__version__}",
                              f"numpy=={np.__version__}"],
            metadata=model_metadata(fitted.feature_names, fitted.proportions, clusters,
                                    fitted.feature_reference),
        )
        # The same model as plain JSON (scaler and KMeans parameters): the worker reads it with
        # json and numpy and never unpickles the Pipeline (model_sources.py).
        from sensor_predictor.kmeans_kernel import from_pipeline
        from sensor_predictor.model_sources import model_document

        kernel = from_pipeline(fitted.pipeline)
        if kernel is None:
            raise RuntimeError("the fitted Pipeline is not a float64 StandardScaler + KMeans")
        mlflow.log_dict(model_document(fitted.feature_names, clusters, fitted.proportions,
                                       kernel, fitted.feature_reference), MODEL_JSON_ARTIFACT)
        run_id = str(run.info.run_id)
    if info.registered_model_version is None:
        raise RuntimeError(f"MLflow did not register a version of {model_name!r}")
    version = int(info.registered_model_version)
    MlflowClient().set_registered_model_alias(model_name, PRODUCTION_ALIAS, str(version))
    log.info("model_logged", run_id=run_id, version=version, model_name=model_name,
             n_clusters=clusters, n_readings=int(matrix.shape[0]), source=source,
             silhouette=round(fitted.silhouette, 4), fit_s=round(fit_seconds, 2))
    return run_id, version, fitted


async def train(
    settings: Settings,
    *,
    clusters: int,
    readings: int = 50_000,
    min_readings: int = 1_000,
    activate: bool,
    seed: int = 0,
    model_name: str | None = None,
    experiment_name: str = EXPERIMENT_NAME,
) -> TrainResult:
    """Train on the latest readings (simulated ones when the database has fewer than
    min_readings usable), log and register the model with alias "production", and with
    `activate` make it the model the workers serve."""
    if clusters < 2:
        raise ValueError(f"clusters must be >= 2, got {clusters}")
    if readings < 1:
        raise ValueError(f"readings must be >= 1, got {readings}")
    name = model_name or settings.model_name
    conn = await db.connect(settings)
    try:
        matrix = await load_training_matrix(conn, readings)
    finally:
        await conn.close()
    source: Source = "database"
    if matrix.shape[0] < max(min_readings, clusters):
        log.info("training_on_generated_readings", usable_in_database=int(matrix.shape[0]),
                 min_readings=min_readings, generated=readings)
        matrix, source = generate_feature_matrix(readings, seed=seed), "generated"
    run_id, version, fitted = await asyncio.to_thread(
        _fit_and_log, settings.mlflow_tracking_uri, name, experiment_name, matrix, clusters,
        seed, source)
    if activate:
        conn = await db.connect(settings)
        try:
            await activate_model(conn, run_id, version, clusters, fitted.silhouette,
                                 fitted.profiles)
        finally:
            await conn.close()
    return TrainResult(
        run_id=run_id, version=version, n_readings=int(matrix.shape[0]), source=source,
        silhouette=fitted.silhouette, proportions=fitted.proportions, n_clusters=clusters,
        profiles=fitted.profiles, activated=activate)


async def activate_model(
    conn: asyncpg.Connection,
    run_id: str,
    version: int | None,
    n_clusters: int | None = None,
    silhouette: float | None = None,
    profiles: Mapping[str, Mapping[str, float]] | None = None,
) -> int:
    """Make a run's model the one served, in one transaction; returns its clusters row id.

    Every other clusters row is deactivated and a versions notice is added, as the old
    trainer did. Activating a run that already has a row (a rollback) reactivates that row.
    The bookkeeping (n_clusters, silhouette, profiles) describes the model and may be left
    out, as a plain SQL activation leaves it out: the worker serves the model all the same.
    Activations are serialised by an advisory lock, so two at once leave one active row.
    The one activation: the trainer, the tests and the bench's setup use it.
    """
    notice = version_label(run_id, version)
    q = db.queries()
    async with conn.transaction():
        await conn.execute(q["activation_lock"], ACTIVATION_LOCK_KEY)
        await conn.execute(q["deactivate_models"])
        row_id: int = await conn.fetchval(
            q["activate_clusters_row"], run_id, version, n_clusters, silhouette,
            None if profiles is None else json.dumps(profiles))
        await conn.execute(q["add_version_notice"], notice, run_id)
    log.info("model_activated", run_id=run_id, version=version, clusters_row=row_id)
    return row_id


async def mark_candidate(conn: asyncpg.Connection, run_id: str, version: int | None) -> int:
    """Make a run's model the shadow candidate (migrations/0006): the workers score the live
    stream with it beside the active model until it is promoted (activated) or withdrawn.
    Returns its model_candidates row id."""
    row_id: int = await conn.fetchval(db.queries()["mark_candidate"], run_id, version)
    log.info("model_marked_candidate", run_id=run_id, version=version, candidate_row=row_id)
    return row_id
