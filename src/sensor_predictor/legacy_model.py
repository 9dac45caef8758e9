"""Serving a run in the old trainer's layout (see model_contract.py). Blocking; runs in a thread.

The run holds the KMeans alone under `kmeans_model` (logged by MLflow 2.x), the fitted
StandardScaler as `scaler.pkl` and the cluster profiles as `profiles.json`, and no feature
metadata. The column order is the keys of the first profile's `all_features` in profiles.json
(json keeps the trainer's order); without that file, the trainer's rule rebuilt from the
clusters row's cluster_profiles keys (jsonb keeps no order). Either way it must agree with the
scaler's and the KMeans' n_features_in_ and with the trainer's rule for the sensors it names.
"""

from __future__ import annotations

import json
import pickle
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from sensor_predictor import db, model_sources
from sensor_predictor.feature_drift import reference_from_kernel
from sensor_predictor.kmeans_kernel import from_parts
from sensor_predictor.model_contract import (
    LEGACY_MODEL_ARTIFACT,
    LEGACY_PROFILES_ARTIFACT,
    LEGACY_SCALER_ARTIFACT,
    legacy_columns,
    legacy_feature_order,
    legacy_order_from_keys,
    legacy_profile_order,
    legacy_sensors,
    profile_feature_sets,
)
from sensor_predictor.model_sources import RunLocation, SourcePolicy, SourceRefused
from sensor_predictor.model_types import (
    ActiveRow,
    Bookkeeping,
    LoadedModel,
    ModelLoadError,
    first_line,
    mlflow_module,
    mlflow_reason,
    warnings_logged,
)


def load_if_legacy(row: ActiveRow, model_name: str, bookkeeping: Bookkeeping | None,
                   run: RunLocation, policy: SourcePolicy) -> LoadedModel | None:
    """The run's old-layout model, verified; None when the run is not in that layout. Every
    location read from is checked against `policy` first (model_sources.py)."""
    mlflow = mlflow_module()
    # An MLflow 3 client logs the KMeans as a logged model, not under the run's artifacts, so
    # scaler.pkl alone marks the layout; the KMeans is found either way.
    if LEGACY_SCALER_ARTIFACT not in run.names:
        return None
    where = f"the old trainer's model of run {row.run_id}"
    base = run.artifact_uri.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="sp-legacy-") as tmp:
        try:
            location = model_sources.model_location(mlflow, run, LEGACY_MODEL_ARTIFACT, policy)
            if location is None:
                raise ModelLoadError("not_found", f"{where} has {LEGACY_SCALER_ARTIFACT} but no "
                                                  f"{LEGACY_MODEL_ARTIFACT}")
            root = Path(tmp)
            kmeans_dir = model_sources.download(mlflow, location, root / "kmeans")
            scaler_path = model_sources.download(
                mlflow, f"{base}/{LEGACY_SCALER_ARTIFACT}", root / "run")
            profiles_path = (model_sources.download(
                mlflow, f"{base}/{LEGACY_PROFILES_ARTIFACT}", root / "run")
                if LEGACY_PROFILES_ARTIFACT in run.names else None)
            digest = model_sources.digest_files(root)
            with warnings_logged(row):
                kmeans = mlflow.sklearn.load_model(str(kmeans_dir))
                scaler = _unpickle(scaler_path)
            file_profiles = None if profiles_path is None else json.loads(
                profiles_path.read_text(encoding="utf-8"))
        except ModelLoadError:
            raise
        except SourceRefused as exc:
            raise ModelLoadError(exc.reason, str(exc)) from None
        except Exception as exc:
            raise ModelLoadError(
                mlflow_reason(exc), f"cannot load {where}: {first_line(exc)}") from exc
    model = build_legacy_model(row, model_name, scaler, kmeans, file_profiles,
                               bookkeeping.profiles if bookkeeping else None)
    return replace(model, artifact_digest=digest, unpickled=True)


def _unpickle(path: Path) -> Any:
    """scaler.pkl: a plain pickle (the trainer's), else a joblib dump (the same object)."""
    data = path.read_bytes()
    try:
        return pickle.loads(data)  # from an allowed source only (model_sources.py)
    except Exception:
        import joblib  # type: ignore[import-untyped]  # scikit-learn's dependency

        return joblib.load(path)


def feature_order(file_profiles: Any, row_profiles: Mapping[str, Any] | None
                  ) -> tuple[tuple[str, ...], str]:
    """The episode model's column order and where it came from."""
    if isinstance(file_profiles, list):
        file_profiles = {str(i): p for i, p in enumerate(file_profiles)}
    if isinstance(file_profiles, Mapping):
        order = legacy_profile_order(file_profiles)
        if order:
            return order, LEGACY_PROFILES_ARTIFACT
        raise ModelLoadError("no_feature_names",
                             f"{LEGACY_PROFILES_ARTIFACT} names no features (all_features)")
    if row_profiles:
        keys = set().union(*profile_feature_sets(row_profiles))
        if keys:
            return legacy_order_from_keys(keys), "cluster_profiles (the trainer's rule)"
    raise ModelLoadError(
        "no_feature_names",
        f"the run has no {LEGACY_PROFILES_ARTIFACT} and its clusters row no cluster_profiles: "
        "the episode model's feature order is unknown")


def build_legacy_model(row: ActiveRow, model_name: str, scaler: Any, kmeans: Any,
                       file_profiles: Any, row_profiles: Mapping[str, Any] | None
                       ) -> LoadedModel:
    """Check the order against the scaler, the KMeans and the profile keys; refuse if they
    disagree. The served model reads the distinct sensors and expands each reading."""
    order, source = feature_order(file_profiles, row_profiles)
    where = f"run {row.run_id} (old trainer's layout, order from {source})"
    if len(set(order)) != len(order):
        raise ModelLoadError("feature_mismatch", f"{where}: a feature is named twice")
    try:
        sensors, columns = legacy_columns(order)
    except ValueError as exc:
        raise ModelLoadError("feature_mismatch", f"{where}: {exc}") from exc
    n_scaler = getattr(scaler, "n_features_in_", None)
    n_kmeans = getattr(kmeans, "n_features_in_", None)
    if n_scaler != len(order) or n_kmeans != len(order):
        raise ModelLoadError(
            "feature_mismatch",
            f"{where}: {len(order)} features, but the scaler was fitted on {n_scaler} and the "
            f"KMeans on {n_kmeans}")
    expected = legacy_feature_order(sensors)
    if set(order) != set(expected):
        raise ModelLoadError(
            "feature_mismatch",
            f"{where}: the features are not the trainer's {len(expected)} for "
            f"{len(sensors)} sensors (4 statistics each, then duration)")
    if isinstance(file_profiles, Mapping):
        odd = [k for k, names in zip(file_profiles, profile_feature_sets(file_profiles),
                                     strict=True) if names != set(order)]
        if odd:
            raise ModelLoadError(
                "feature_mismatch",
                f"{where}: profiles {', '.join(map(str, odd[:3]))} name other features "
                "than the first")
    named = getattr(scaler, "feature_names_in_", None)
    if named is not None and tuple(str(n) for n in named) != order:
        raise ModelLoadError(
            "feature_mismatch", f"{where}: the scaler names its columns in another order")
    kernel = from_parts(scaler, kmeans, columns, len(sensors))
    if kernel is None:
        raise ModelLoadError(
            "load_failed",
            f"{where}: expected a fitted StandardScaler and KMeans (float64), got "
            f"{type(scaler).__name__} and {type(kmeans).__name__}")
    assert legacy_sensors(order) == sensors
    return LoadedModel(
        row=row, model_name=model_name, feature_names=sensors, n_clusters=kernel.n_clusters,
        reference=None,  # episode proportions say nothing of a stream of readings
        read_query=db.read_range_query(sensors), pipeline=None, kernel=kernel, legacy=True,
        model_features=order,
        # Per-feature drift over the sensors' `_mean` columns of the fitted scaler. No outlier
        # share: a reading mapped to an episode (std and duration 0) lies elsewhere than the
        # episodes the distances were fitted on.
        feature_reference=reference_from_kernel(sensors, kernel.mean, kernel.scale,
                                                kernel.columns, order))
