"""What a served model is: the one contract between the trainer, the holder, the cache and tests.

Two layouts are served.

* Ours (`sensor-predictor train`): one scikit-learn Pipeline (StandardScaler, KMeans) logged
  under the run's `model` artifact, fitted on a float64 matrix whose columns are the features in
  the order of the `feature_names` metadata; the training cluster proportions (the drift
  reference) in `training_cluster_proportions`.
* The old trainer's (MLflow 2.x): the KMeans alone under `kmeans_model`, the fitted
  StandardScaler pickled as `scaler.pkl` and the cluster profiles as `profiles.json` at the run's
  artifact root, no feature metadata. It was fitted on failure *episodes*: for every sensor,
  string-sorted, `<sensor>_mean`, `_std`, `_min`, `_max`, then `duration`. A single reading is
  mapped the way the old predictor did: the sensor's value for `_mean`, `_min` and `_max`, 0 for
  `_std` and `duration`.

Pure: no I/O, no numpy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# -- ours ---------------------------------------------------------------------------------------

# The sensors the simulator writes and `train` fits on, in the model's column order.
FEATURE_NAMES: tuple[str, ...] = tuple(f"Sensor {i}" for i in range(1, 21))

# The name under which training.py logs the Pipeline inside its run.
MODEL_ARTIFACT = "model"
# MLflow model metadata keys.
FEATURES_KEY = "feature_names"
PROPORTIONS_KEY = "training_cluster_proportions"
N_CLUSTERS_KEY = "n_clusters"
# Per feature, the training mean and deviation, and the training nearest-centre distance
# percentiles (feature_drift.FeatureReference.to_json()): the per-feature drift reference.
FEATURE_REFERENCE_KEY = "feature_reference"

# Beside the Pipeline, `train` logs the scaler's and the KMeans' parameters as plain JSON in the
# run (model_sources.py reads it with json and numpy: no pickle, no scikit-learn).
MODEL_JSON_ARTIFACT = "sensor_predictor_model.json"
MODEL_JSON_FORMAT = 1

# predictions.model_version is varchar(50).
VERSION_LABEL_MAX = 50


def version_label(run_id: str, registered_version: int | None) -> str:
    """The model_version written with each prediction (and in the versions notices): the
    registered version as text ("1", "2", ... as the old predictor wrote), else run-<run id>."""
    if registered_version is not None:
        return str(registered_version)
    return f"run-{run_id}"[:VERSION_LABEL_MAX]


def model_metadata(feature_names: Sequence[str], proportions: Sequence[float],
                   n_clusters: int, feature_reference: Mapping[str, Any] | None = None
                   ) -> dict[str, Any]:
    """The metadata `train` logs with the Pipeline and the holder reads back."""
    metadata: dict[str, Any] = {
        FEATURES_KEY: list(feature_names), PROPORTIONS_KEY: [float(p) for p in proportions],
        N_CLUSTERS_KEY: int(n_clusters)}
    if feature_reference is not None:
        metadata[FEATURE_REFERENCE_KEY] = dict(feature_reference)
    return metadata


# -- the old trainer's layout ---------------------------------------------------------------------

LEGACY_MODEL_ARTIFACT = "kmeans_model"
LEGACY_SCALER_ARTIFACT = "scaler.pkl"
LEGACY_PROFILES_ARTIFACT = "profiles.json"
LEGACY_REGISTERED_MODEL = "sensor_failure_clustering"
LEGACY_EXPERIMENT = "Sensor Failure Clustering"
# Per sensor, in this order; then DURATION.
LEGACY_STATISTICS: tuple[str, ...] = ("mean", "std", "min", "max")
LEGACY_DURATION = "duration"
# What a single reading gives each statistic: its value, or 0 (one reading has no spread).
LEGACY_FROM_VALUE = frozenset({"mean", "min", "max"})
# In cluster_profiles / profiles.json, each profile's feature means are under this key.
LEGACY_PROFILE_FEATURES = "all_features"


def legacy_feature_order(sensors: Iterable[str]) -> tuple[str, ...]:
    """The old trainer's column order: sensors string-sorted ("Sensor 1", "Sensor 10", ...,
    "Sensor 2", ...), each with its four statistics, then duration."""
    return (*(f"{sensor}_{stat}" for sensor in sorted(set(sensors))
              for stat in LEGACY_STATISTICS), LEGACY_DURATION)


def parse_legacy_feature(name: str) -> tuple[str, str] | None:
    """(sensor, statistic) of an episode feature; None for duration or an unknown name."""
    sensor, sep, stat = name.rpartition("_")
    if sep and sensor and stat in LEGACY_STATISTICS:
        return sensor, stat
    return None


def legacy_order_from_keys(keys: Iterable[str]) -> tuple[str, ...]:
    """The trainer's rule applied to a set of feature names (jsonb keeps no order): every sensor
    named by a `<sensor>_<statistic>` key, in the trainer's order."""
    return legacy_feature_order(p[0] for k in keys if (p := parse_legacy_feature(k)) is not None)


def legacy_sensors(order: Sequence[str]) -> tuple[str, ...]:
    """The distinct sensors of an episode feature order, in order of first appearance: the keys
    the worker extracts from each reading."""
    seen: dict[str, None] = {}
    for name in order:
        parsed = parse_legacy_feature(name)
        if parsed is not None:
            seen.setdefault(parsed[0], None)
    return tuple(seen)


def legacy_columns(order: Sequence[str]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """How one reading fills the episode vector: the sensors to read, and for each column of
    `order` the index of the sensor whose value it takes, or -1 for 0 (`_std`, `duration`).

    Raises ValueError for a name the old predictor's mapping cannot fill.
    """
    sensors = legacy_sensors(order)
    index = {s: i for i, s in enumerate(sensors)}
    columns: list[int] = []
    for name in order:
        parsed = parse_legacy_feature(name)
        if parsed is None:
            if name != LEGACY_DURATION:
                raise ValueError(f"{name!r} is neither <sensor>_<{'|'.join(LEGACY_STATISTICS)}>"
                                 f" nor {LEGACY_DURATION!r}")
            columns.append(-1)
        else:
            columns.append(index[parsed[0]] if parsed[1] in LEGACY_FROM_VALUE else -1)
    return sensors, tuple(columns)


def legacy_profile_order(profiles: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The feature names of the first profile's `all_features`, in the mapping's own order (a
    dict from json.loads keeps the file's order); None when the profiles carry none."""
    for profile in profiles.values():
        features = profile.get(LEGACY_PROFILE_FEATURES) if isinstance(profile, Mapping) else None
        if isinstance(features, Mapping) and features:
            return tuple(str(k) for k in features)
        return None
    return None


def profile_feature_sets(profiles: Mapping[str, Any]) -> list[frozenset[str]]:
    """Each profile's feature names, whichever layout wrote it: ours ({feature: centre}) or the
    old trainer's ({"all_features": {feature: mean}, ...})."""
    out: list[frozenset[str]] = []
    for profile in profiles.values():
        if not isinstance(profile, Mapping):
            out.append(frozenset())
            continue
        features = profile.get(LEGACY_PROFILE_FEATURES)
        if isinstance(features, Mapping):
            out.append(frozenset(str(k) for k in features))
        else:
            out.append(frozenset(str(k) for k in profile))
    return out
