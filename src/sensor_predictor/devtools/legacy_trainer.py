"""The old trainer and the old predictor's mapping, reproduced: models in the old layout, for tests.

`log_legacy_model` trains and logs exactly the way the old system's trainer does (see
model_contract.py and ../shared/seed/old-system.md): one row per failure episode with, for every
sensor in string-sorted order, `_mean`, `_std`, `_min`, `_max`, then `duration`; a StandardScaler
fitted on the plain numpy array; `mlflow.sklearn.log_model(kmeans, "kmeans_model",
registered_model_name=..., input_example=X[0:1])` with the artifact path positional;
`scaler.pkl` and `profiles.json` at the run's root; alias `production`. `activate_like_old_trainer`
writes its clusters row the way it does (two autocommitted statements).

`old_predictor_labels` is the oracle: what the old predictor's mapping gives for single readings
(value for `_mean`/`_min`/`_max`, 0 for `_std` and anything else), in the correct column order,
through scikit-learn's own scaler.transform and kmeans.predict.

This module imports only the standard library and model_contract (itself pure) at the top, so it
also runs as a script under another interpreter, such as a venv holding an MLflow 2.x client:

    PYTHONPATH=src python -m sensor_predictor.devtools.legacy_trainer \\
        --tracking-uri http://127.0.0.1:5000 --episodes episodes.json --clusters 4 --seed 0

prints {"run_id": ..., "version": ..., "profiles": ..., "silhouette": ...} as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sensor_predictor.model_contract import (
    FEATURE_NAMES,
    LEGACY_DURATION,
    LEGACY_EXPERIMENT,
    LEGACY_MODEL_ARTIFACT,
    LEGACY_PROFILE_FEATURES,
    LEGACY_PROFILES_ARTIFACT,
    LEGACY_REGISTERED_MODEL,
    LEGACY_SCALER_ARTIFACT,
)

Episode = Sequence[Mapping[str, float]]
PRODUCTION_ALIAS = "production"
DEFAULT_EPISODE_LENGTH = 10


def episodes_from(readings_matrix_or_episodes: Any,
                  episode_length: int = DEFAULT_EPISODE_LENGTH) -> list[list[dict[str, float]]]:
    """Episodes as lists of readings ({sensor: value}). A (n, s) matrix of readings is cut into
    consecutive episodes of `episode_length` readings, its columns FEATURE_NAMES[:s]."""
    if hasattr(readings_matrix_or_episodes, "ndim"):
        matrix = readings_matrix_or_episodes
        names = FEATURE_NAMES[: matrix.shape[1]]
        rows = [dict(zip(names, map(float, row), strict=True)) for row in matrix.tolist()]
        return [rows[i:i + episode_length] for i in range(0, len(rows), episode_length)]
    return [[{str(k): float(v) for k, v in reading.items()} for reading in episode]
            for episode in readings_matrix_or_episodes]


def episode_features(episodes: Sequence[Episode]) -> tuple[list[str], Any]:
    """The old trainer's matrix: one row per episode, sensors string-sorted, four statistics
    each, then duration (the number of readings)."""
    import numpy as np

    sensors = sorted({name for episode in episodes for reading in episode for name in reading})
    columns = [f"{s}_{stat}" for s in sensors for stat in ("mean", "std", "min", "max")]
    columns.append(LEGACY_DURATION)
    rows = []
    for episode in episodes:
        row: list[float] = []
        for sensor in sensors:
            values = np.array([reading[sensor] for reading in episode], dtype=np.float64)
            std = float(values.std(ddof=1)) if len(values) > 1 else 0.0  # pandas' std, NaN->0
            row += [float(values.mean()), std, float(values.min()), float(values.max())]
        row.append(float(len(episode)))
        rows.append(row)
    return columns, np.asarray(rows, dtype=np.float64)


def fit_legacy(episodes: Sequence[Episode], n_clusters: int, seed: int) -> dict[str, Any]:
    """Fit the old trainer's scaler and KMeans; its profiles and silhouette score."""
    import numpy as np
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score
    from sklearn.preprocessing import StandardScaler

    columns, x = episode_features(episodes)
    scaler = StandardScaler().fit(x)
    scaled = scaler.transform(x)
    kmeans = KMeans(n_clusters=n_clusters, random_state=seed, n_init=10).fit(scaled)
    labels = kmeans.labels_
    profiles: dict[str, Any] = {}
    for c in range(n_clusters):
        members = x[labels == c]
        z = np.abs(scaled[labels == c].mean(axis=0))
        top = [columns[i] for i in np.argsort(-z)[:5]]
        profiles[f"cluster_{c}"] = {
            "size": len(members), "distinctive_features": top,
            LEGACY_PROFILE_FEATURES: {name: float(v) for name, v in
                                      zip(columns, members.mean(axis=0), strict=True)}}
    return {"columns": columns, "x": x, "scaler": scaler, "kmeans": kmeans,
            "profiles": profiles, "silhouette": float(silhouette_score(scaled, labels))}


def log_legacy_model(tracking_uri: str, readings_matrix_or_episodes: Any, n_clusters: int,
                     seed: int, *, registered_model_name: str = LEGACY_REGISTERED_MODEL,
                     write_profiles: bool = True) -> tuple[str, int, dict[str, Any]]:
    """Train and log like the old trainer; (run id, registered version, cluster_profiles).

    Runs with whichever MLflow is importable (ours, or a 2.x client run as a script); with
    write_profiles=False the run has no profiles.json (an older trainer's run).
    """
    return _log(tracking_uri, episodes_from(readings_matrix_or_episodes), n_clusters, seed,
                registered_model_name, write_profiles)[:3]


def _log(tracking_uri: str, episodes: Sequence[Episode], n_clusters: int, seed: int,
         registered_model_name: str, write_profiles: bool
         ) -> tuple[str, int, dict[str, Any], float]:
    import mlflow
    import mlflow.sklearn
    from mlflow import MlflowClient

    fitted = fit_legacy(episodes, n_clusters, seed)
    x = fitted["x"]
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(LEGACY_EXPERIMENT)
    with mlflow.start_run() as run:
        mlflow.log_params({"n_clusters": n_clusters, "n_episodes": len(episodes)})
        mlflow.log_metric("silhouette_score", fitted["silhouette"])
        # Exactly the old trainer's call: the artifact path positional (MLflow 2.x).
        info = mlflow.sklearn.log_model(
            fitted["kmeans"], LEGACY_MODEL_ARTIFACT,
            registered_model_name=registered_model_name, input_example=x[0:1])
        with tempfile.TemporaryDirectory() as tmp:
            scaler_path = Path(tmp) / LEGACY_SCALER_ARTIFACT
            with open(scaler_path, "wb") as f:
                pickle.dump(fitted["scaler"], f)
            mlflow.log_artifact(str(scaler_path))
            if write_profiles:
                profiles_path = Path(tmp) / LEGACY_PROFILES_ARTIFACT
                with open(profiles_path, "w") as f:
                    json.dump(fitted["profiles"], f)
                mlflow.log_artifact(str(profiles_path))
        run_id = run.info.run_id
    client = MlflowClient()
    version = getattr(info, "registered_model_version", None)
    if version is None:
        found = client.search_model_versions(f"run_id='{run_id}'")
        version = max(int(v.version) for v in found)
    client.set_registered_model_alias(registered_model_name, PRODUCTION_ALIAS, str(version))
    return run_id, int(version), fitted["profiles"], fitted["silhouette"]


async def activate_like_old_trainer(conn: Any, run_id: str, version: int, n_clusters: int,
                                    silhouette: float | None,
                                    profiles: Mapping[str, Any] | None) -> int:
    """The old trainer's activation: the new row active first, then (another autocommitted
    statement) every other row inactive, then a versions notice. For a moment two rows are
    active. Returns the new clusters row id."""
    row_id: int = await conn.fetchval(
        "INSERT INTO clusters (mlflow_run_id, mlflow_model_version, is_active, n_clusters,"
        " silhouette_score, cluster_profiles, created_at)"
        " VALUES ($1, $2, true, $3, $4, $5::jsonb, now()) RETURNING id",
        run_id, version, n_clusters, silhouette,
        None if profiles is None else json.dumps(profiles))
    await conn.execute("UPDATE clusters SET is_active = false WHERE id <> $1 AND is_active",
                       row_id)
    await conn.execute(
        "INSERT INTO versions (version, run_id, is_processed, created_at)"
        " VALUES ($1, $2, false, now())", str(version), run_id)
    return row_id


def fetch_legacy_parts(tracking_uri: str, run_id: str) -> tuple[Any, Any, list[str]]:
    """The run's scaler, KMeans and column order, fetched with plain MLflow (not our loader)."""
    import mlflow
    import mlflow.sklearn
    from sklearn.exceptions import InconsistentVersionWarning

    mlflow.set_tracking_uri(tracking_uri)
    with warnings.catch_warnings():
        # Pickled by the old stack's scikit-learn: the old predictor loaded it all the same.
        warnings.simplefilter("ignore", InconsistentVersionWarning)
        kmeans = mlflow.sklearn.load_model(f"runs:/{run_id}/{LEGACY_MODEL_ARTIFACT}")
        with tempfile.TemporaryDirectory() as tmp:
            scaler_file = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=LEGACY_SCALER_ARTIFACT, dst_path=tmp)
            with open(scaler_file, "rb") as f:
                scaler = pickle.load(f)
            profiles_file = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=LEGACY_PROFILES_ARTIFACT, dst_path=tmp)
            with open(profiles_file) as f:
                profiles = json.load(f)
    first = next(iter(profiles.values()))
    return scaler, kmeans, list(first[LEGACY_PROFILE_FEATURES])


def old_predictor_labels(scaler: Any, kmeans: Any, order: Sequence[str],
                         readings: Sequence[Mapping[str, float]]) -> Any:
    """The oracle: the old predictor's per-reading mapping in the correct order, then
    scikit-learn's scaler.transform and kmeans.predict."""
    import numpy as np

    rows = []
    for reading in readings:
        row = []
        for feature in order:
            sensor, _, stat = feature.rpartition("_")
            if stat in ("mean", "min", "max") and sensor in reading:
                row.append(float(reading[sensor]))
            else:  # _std of one reading, duration, or a feature the reading lacks
                row.append(0.0)
        rows.append(row)
    x = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(order))
    return np.asarray(kmeans.predict(scaler.transform(x)), dtype=np.int64)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="log a model the way the old trainer does")
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--episodes", required=True, help="JSON: a list of lists of readings")
    parser.add_argument("--clusters", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--registered-model-name", default=LEGACY_REGISTERED_MODEL)
    parser.add_argument("--no-profiles", action="store_true", help="log no profiles.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    episodes = json.loads(Path(args.episodes).read_text())
    run_id, version, profiles, silhouette = _log(
        args.tracking_uri, episodes_from(episodes), args.clusters, args.seed,
        args.registered_model_name, not args.no_profiles)
    import mlflow

    print(json.dumps({"run_id": run_id, "version": version, "profiles": profiles,
                      "silhouette": silhouette, "mlflow_version": mlflow.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
