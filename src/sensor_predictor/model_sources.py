"""Where a model may come from, how ours is read without pickle, and what its artifacts were.

Loading a scikit-learn model from MLflow unpickles it: whoever chooses the artifacts chooses
code the worker runs. Three rules narrow that down (docs/security.md):

- **Allowed sources.** The tracking URI and every artifact location a model is read from (the
  run's artifact URI, a logged model's artifact location) must lie under one of the prefixes of
  MODEL_SOURCES_ALLOWED; anything else is refused with reason `source_not_allowed`. Unset, the
  list is the tracking URI itself: artifacts served through it (`mlflow-artifacts:`), and for a
  local store (sqlite:///dir/mlflow.db, file:///dir) the store's own folder. Files are
  compared by their normalised path (no `..` escapes), URLs without their credentials.
- **No pickle for our models.** `sensor-predictor train` logs the scaler's and the KMeans'
  parameters as plain JSON beside the Pipeline (MODEL_JSON_ARTIFACT); when a run has it, the
  model is built from it with json and numpy alone. A run without it (older runs, other tools,
  the old trainer's layout) is unpickled as before, from an allowed source only; a run whose
  JSON or whose `model` fails to load is refused, never retried through another pickle.
- **Artifacts do not change.** The sha256 of the artifacts read (`artifact_digest`) is recorded
  in model_artifact_digests when the model is first served; a later load of the same run and
  version whose artifacts differ is refused with reason `artifacts_changed`.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import asyncpg

from sensor_predictor import db
from sensor_predictor.kmeans_kernel import KMeansKernel
from sensor_predictor.logging_setup import redact_text
from sensor_predictor.model_contract import MODEL_JSON_FORMAT


class SourceRefused(Exception):
    """A model's tracking or artifact location is not allowed; `reason` is a metric label."""

    reason: Literal["source_not_allowed"] = "source_not_allowed"


def _local_path(uri: str) -> str | None:
    """The normalised absolute path of a file URI or a plain path; None for anything else."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme == "file":
        path = urllib.parse.unquote(parsed.path)
    elif parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        path = uri
    else:
        return None
    return os.path.normpath(os.path.abspath(path))


def normalise(uri: str, tracking_uri: str) -> str:
    """A location as compared with the allowed prefixes: files by their normalised path,
    `mlflow-artifacts:` by the server that serves them, URLs lower-cased and without
    credentials, no trailing slash."""
    path = _local_path(uri)
    if path is not None:
        return "file://" + path.rstrip("/") if path != "/" else "file:///"
    parsed = urllib.parse.urlsplit(uri)
    scheme = parsed.scheme.lower()
    if scheme == "mlflow-artifacts":
        if not parsed.netloc:
            return normalise(tracking_uri, tracking_uri)  # served by the tracking server
        served = urllib.parse.urlsplit(tracking_uri).scheme or "http"
        return normalise(f"{served}://{parsed.netloc}", tracking_uri)
    host = parsed.netloc.rpartition("@")[2].lower()  # no credentials
    path_part = os.path.normpath(parsed.path) if parsed.path else ""
    if path_part in (".", "/"):
        path_part = ""
    return f"{scheme}://{host}{path_part}".rstrip("/")


def default_sources(tracking_uri: str) -> tuple[str, ...]:
    """The tracking URI itself, and for a local store its folder."""
    sources = [tracking_uri]
    if tracking_uri.startswith("sqlite:///"):
        sources.append("file://" + os.path.dirname(
            os.path.abspath(urllib.parse.unquote(tracking_uri[len("sqlite:///"):]))))
    return tuple(sources)


@dataclass(frozen=True)
class SourcePolicy:
    """The allowed prefixes for one tracking URI."""

    tracking_uri: str
    allowed: tuple[str, ...] = ()
    """As configured (MODEL_SOURCES_ALLOWED); empty: default_sources(tracking_uri)."""

    def prefixes(self) -> tuple[str, ...]:
        return tuple(normalise(a, self.tracking_uri)
                     for a in (self.allowed or default_sources(self.tracking_uri)))

    def allows(self, uri: str) -> bool:
        where = normalise(uri, self.tracking_uri)
        return any(where == p or where.startswith(p.rstrip("/") + "/") for p in self.prefixes())

    def check(self, uri: str, what: str) -> None:
        if not self.allows(uri):
            raise SourceRefused(
                f"{what} {redact_text(uri)} is not an allowed model source "
                f"(MODEL_SOURCES_ALLOWED: {', '.join(redact_text(p) for p in self.prefixes())})")


# -- digests ------------------------------------------------------------------------------------


def digest_files(root: Path, files: Sequence[Path] | None = None) -> str:
    """sha256 over the files' paths (relative to root) and contents, in path order."""
    chosen = sorted(files if files is not None else (p for p in root.rglob("*") if p.is_file()))
    outer = hashlib.sha256()
    for path in chosen:
        inner = hashlib.sha256(path.read_bytes()).hexdigest()
        outer.update(f"{path.relative_to(root).as_posix()}\0{inner}\n".encode())
    return "sha256:" + outer.hexdigest()


async def record_digest(conn: asyncpg.Connection | asyncpg.Pool, run_id: str,
                        model_version: str, digest: str | None) -> str | None:
    """Record the digest the first time a model is served; the digest on record when it
    differs from `digest` (the artifacts changed), else None."""
    if digest is None:
        return None  # nothing to compare (a cache entry written before digests were kept)
    query = db.queries()["record_model_digest"]
    recorded = await conn.fetchval(query, run_id, model_version, digest)
    if recorded is None:  # a concurrent first record, not visible to that statement yet
        recorded = await conn.fetchval(query, run_id, model_version, digest)
    return None if recorded in (None, digest) else str(recorded)


# -- the JSON model -----------------------------------------------------------------------------


def model_document(feature_names: Sequence[str], n_clusters: int,
                   proportions: Sequence[float] | None, kernel: KMeansKernel,
                   feature_reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """What `train` logs as MODEL_JSON_ARTIFACT (feature_reference: the per-feature drift
    reference, feature_drift.FeatureReference.to_json())."""
    document = {"format": MODEL_JSON_FORMAT, "kind": "StandardScaler+KMeans",
                "feature_names": list(feature_names), "n_clusters": int(n_clusters),
                "training_cluster_proportions":
                    None if proportions is None else [float(p) for p in proportions],
                "kernel": kernel.to_arrays()}
    if feature_reference is not None:
        document["feature_reference"] = feature_reference
    return document


@dataclass(frozen=True)
class JsonModel:
    feature_names: tuple[str, ...]
    n_clusters: int
    reference: tuple[float, ...] | None
    kernel: KMeansKernel
    feature_reference: dict[str, Any] | None = None
    """The per-feature drift reference as logged (checked where it is used)."""


def parse_model_document(raw: bytes) -> JsonModel:
    """The model of a MODEL_JSON_ARTIFACT; ValueError saying what is wrong with it."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != MODEL_JSON_FORMAT:
        raise ValueError(f"format {data.get('format') if isinstance(data, dict) else None!r}, "
                         f"not {MODEL_JSON_FORMAT}")
    names = data.get("feature_names")
    if (not isinstance(names, list) or not names
            or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names)):
        raise ValueError("feature_names must be distinct non-empty strings")
    kernel_data = data.get("kernel")
    if not isinstance(kernel_data, dict) or kernel_data.get("columns") is not None:
        raise ValueError("kernel must hold mean, scale and centers, and no column map")
    try:
        kernel = KMeansKernel.from_arrays(kernel_data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"kernel: {exc}") from None
    if kernel.n_inputs != len(names):
        raise ValueError(f"the kernel takes {kernel.n_inputs} features, the file names "
                         f"{len(names)}")
    n_clusters = data.get("n_clusters")
    if n_clusters != kernel.n_clusters:
        raise ValueError(f"n_clusters {n_clusters!r}, but {kernel.n_clusters} centres")
    reference = data.get("training_cluster_proportions")
    if reference is not None and (not isinstance(reference, list)
                                  or len(reference) != kernel.n_clusters
                                  or not all(isinstance(p, (int, float)) for p in reference)):
        reference = None  # unusable; the drift tracker falls back to the first full window
    feature_ref = data.get("feature_reference")
    return JsonModel(tuple(names), kernel.n_clusters,
                     None if reference is None else tuple(float(p) for p in reference), kernel,
                     feature_ref if isinstance(feature_ref, dict) else None)


# -- where a run's artifacts are ------------------------------------------------------------------


@dataclass(frozen=True)
class RunLocation:
    run_id: str
    artifact_uri: str
    experiment_id: str
    names: frozenset[str]
    """The names at the root of the run's own artifacts."""


def locate_run(mlflow: Any, run_id: str, policy: SourcePolicy) -> RunLocation:
    """The run's artifact location, checked against the policy (the tracking URI first)."""
    policy.check(policy.tracking_uri, "the tracking URI")
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    artifact_uri = str(run.info.artifact_uri)
    policy.check(artifact_uri, f"the artifacts of run {run_id}")
    repo_names = {Path(a.path).name for a in _list(mlflow, artifact_uri)}
    return RunLocation(run_id, artifact_uri, str(run.info.experiment_id),
                       frozenset(repo_names))


def _list(mlflow: Any, artifact_uri: str) -> list[Any]:
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return list(get_artifact_repository(artifact_uri).list_artifacts())


def model_location(mlflow: Any, run: RunLocation, name: str, policy: SourcePolicy
                   ) -> str | None:
    """Where the run's model `name` is: a logged model's artifact location (MLflow 3), or the
    folder of that name in the run's artifacts (MLflow 2); checked. None: the run has none."""
    client = mlflow.MlflowClient()
    token: str | None = None
    while True:
        try:
            page = client.search_logged_models(
                experiment_ids=[run.experiment_id], filter_string=f"name = '{name}'",
                page_token=token)
        except Exception as exc:
            text = f"{type(exc).__name__} {exc}".lower()
            if any(w in text for w in ("connection", "max retries", "timed out")):
                raise
            break  # a server without logged models (MLflow 2): the run's own folder
        for model in page:
            if model.source_run_id == run.run_id:
                location = str(model.artifact_location)
                policy.check(location, f"the model {name!r} of run {run.run_id}")
                return location
        token = page.token
        if not token:
            break
    if name in run.names:
        return f"{run.artifact_uri.rstrip('/')}/{name}"
    return None


def download(mlflow: Any, artifact_uri: str, dst: Path) -> Path:
    """The artifact (a file or a folder) at an already checked location, downloaded."""
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri,
                                                    dst_path=str(dst)))
