"""The model being served: loaded from MLflow off the event loop, verified, swapped atomically.

What a model must be is in model_contract.py. Two layouts are served: ours (`runs:/<run>/model`,
a Pipeline with ordered feature names) and the old trainer's (see legacy_model.py). A model made
of a StandardScaler and a KMeans predicts with numpy alone (kmeans_kernel.py), and once verified
it is kept in a local cache (model_cache.py), so a restarted worker serves it without importing
MLflow or scikit-learn. A model the cache does not hold is fetched by a child process
(model_fetch.py, which runs `load_and_verify` there and hands back the model's numpy form), so
the worker never imports them at all; `load_and_verify` runs in a thread of the worker only for
a model without a numpy form, and in tools (rescore).
The types it deals in (LoadedModel, ActiveRow, ModelLoadError, ...) live in model_types.py.

Longer than most modules (about 380 lines): loading, verifying, the bookkeeping check, the
cache and the swap with its backoff are one state machine around `ModelHolder.current`, for
the active model and for a shadow candidate alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import structlog

from sensor_predictor import cluster_registry, db, legacy_model, model_fetch, model_sources
from sensor_predictor.faults import in_daemon_thread
from sensor_predictor.feature_drift import FeatureReference, reference_from_kernel
from sensor_predictor.kmeans_kernel import KMeansKernel
from sensor_predictor.model_cache import CacheEntry, ModelCache
from sensor_predictor.model_contract import (
    FEATURE_REFERENCE_KEY,
    FEATURES_KEY,
    MODEL_ARTIFACT,
    MODEL_JSON_ARTIFACT,
    PROPORTIONS_KEY,
    profile_feature_sets,
)
from sensor_predictor.model_sources import SourcePolicy, SourceRefused
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

log = structlog.get_logger("sensor_predictor.model_holder")

# How many recent readings the feature check samples, and the share that must carry every
# feature the model needs (the rest may be bad readings, which happen).
FEATURE_CHECK_SAMPLE = 100
FEATURE_CHECK_MIN_SHARE = 0.5


def load_and_verify(row: ActiveRow, model_name: str,
                    bookkeeping: Bookkeeping | None = None,
                    sources: SourcePolicy | None = None) -> LoadedModel:
    """Blocking: fetch the run's model from an allowed source (model_sources.py) and check it
    can serve. Runs in the fetch process (model_fetch_child.py), or a thread. Ours is read
    from its JSON artifact (no pickle); a run without one from its `model` (unpickled); a run
    with neither in the old trainer's layout."""
    mlflow = mlflow_module()
    policy = sources or SourcePolicy(str(mlflow.get_tracking_uri()))
    uri = f"runs:/{row.run_id}/{MODEL_ARTIFACT}"
    with _refusals(f"cannot load {uri} from MLflow"):
        run = model_sources.locate_run(mlflow, row.run_id, policy)
    if MODEL_JSON_ARTIFACT in run.names:
        return _verified(_load_json(mlflow, row, model_name, run), uri)
    with _refusals(f"cannot look up {uri} in MLflow"):
        location = model_sources.model_location(mlflow, run, MODEL_ARTIFACT, policy)
    if location is None:  # no model of ours at all: the old trainer's layout, or nothing
        failure = ModelLoadError("not_found", f"run {row.run_id} has no {MODEL_ARTIFACT!r} "
                                 f"model and no {MODEL_JSON_ARTIFACT}")
        return _verified(_legacy_or_raise(row, model_name, bookkeeping, failure, run, policy),
                         uri)
    # A `model` that fails to load is refused: never retried through another pickle.
    with (tempfile.TemporaryDirectory(prefix="sp-model-") as tmp,
          _refusals(f"cannot load {uri} from MLflow"), warnings_logged(row)):
        local = model_sources.download(mlflow, location, Path(tmp))
        digest = model_sources.digest_files(local)
        metadata = mlflow.models.Model.load(str(local)).metadata or {}
        pipeline = mlflow.sklearn.load_model(str(local))
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
    n_clusters = _cluster_count(pipeline) or (bookkeeping.n_clusters if bookkeeping else None) \
        or row.n_clusters or 1
    reference = metadata.get(PROPORTIONS_KEY)
    if reference is not None and (not isinstance(reference, list)
                                  or len(reference) != n_clusters):
        reference = None  # unusable; the drift tracker falls back to the first full window
    from sensor_predictor.kmeans_kernel import from_pipeline

    kernel = from_pipeline(pipeline)
    model = LoadedModel(
        row=row, model_name=model_name, feature_names=tuple(names),
        n_clusters=int(n_clusters),
        reference=tuple(float(p) for p in reference) if reference else None,
        read_query=db.read_range_query(names), pipeline=pipeline,
        kernel=kernel, model_features=tuple(names), artifact_digest=digest, unpickled=True,
        feature_reference=feature_reference(metadata.get(FEATURE_REFERENCE_KEY), tuple(names),
                                            kernel, pipeline))
    return _verified(model, uri)


def feature_reference(logged: Any, names: tuple[str, ...], kernel: KMeansKernel | None,
                      pipeline: Any = None, model_features: tuple[str, ...] = ()
                      ) -> FeatureReference | None:
    """The per-feature drift reference: the one `train` logged when it is usable, else the
    fitted scaler's moments (no outlier share then); None when neither is at hand."""
    if isinstance(logged, Mapping):
        try:
            ref = FeatureReference.from_json(logged)
            if ref.names == names:
                return ref
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("feature_reference_unusable", error=str(exc)[:300],
                        note="using the scaler's moments")
    if kernel is None and pipeline is not None:
        from sensor_predictor.kmeans_kernel import from_parts

        steps = getattr(pipeline, "steps", None)
        kernel = from_parts(steps[0][1], steps[1][1]) if steps and len(steps) == 2 else None
    if kernel is None or kernel.n_inputs != len(names):
        return None
    try:
        return reference_from_kernel(names, kernel.mean, kernel.scale, kernel.columns,
                                     model_features)
    except ValueError:
        return None


@contextlib.contextmanager
def _refusals(what: str) -> Iterator[None]:
    """A refused source, or MLflow's failure, as a ModelLoadError with its reason."""
    try:
        yield
    except ModelLoadError:
        raise
    except SourceRefused as exc:
        raise ModelLoadError(exc.reason, str(exc)) from None
    except Exception as exc:
        raise ModelLoadError(mlflow_reason(exc), f"{what}: {first_line(exc)}") from exc


def _load_json(mlflow: Any, row: ActiveRow, model_name: str,
               run: model_sources.RunLocation) -> LoadedModel:
    """Our model from its JSON artifact: json and numpy, no pickle, no scikit-learn."""
    with (tempfile.TemporaryDirectory(prefix="sp-model-") as tmp,
          _refusals(f"cannot fetch {MODEL_JSON_ARTIFACT} of run {row.run_id} from MLflow")):
        path = model_sources.download(
            mlflow, f"{run.artifact_uri.rstrip('/')}/{MODEL_JSON_ARTIFACT}", Path(tmp))
        raw = path.read_bytes()
        digest = model_sources.digest_files(path.parent, [path])
    try:
        parsed = model_sources.parse_model_document(raw)
    except ValueError as exc:
        raise ModelLoadError(
            "bad_model_artifact",
            f"{MODEL_JSON_ARTIFACT} of run {row.run_id}: {exc} (the run's pickled model is "
            "not tried instead)") from None
    return LoadedModel(
        row=row, model_name=model_name, feature_names=parsed.feature_names,
        n_clusters=parsed.n_clusters, reference=parsed.reference,
        read_query=db.read_range_query(parsed.feature_names), kernel=parsed.kernel,
        model_features=parsed.feature_names, artifact_digest=digest,
        feature_reference=feature_reference(parsed.feature_reference, parsed.feature_names,
                                            parsed.kernel))


def _legacy_or_raise(row: ActiveRow, model_name: str, bookkeeping: Bookkeeping | None,
                     failure: ModelLoadError, run: model_sources.RunLocation,
                     policy: SourcePolicy) -> LoadedModel:
    """The run in the old trainer's layout, when it is one; else `failure`."""
    model = legacy_model.load_if_legacy(row, model_name, bookkeeping, run, policy)
    if model is None:
        raise failure
    return model


def _verified(model: LoadedModel, uri: str) -> LoadedModel:
    try:
        labels, _ = model.predict(np.zeros((1, len(model.feature_names)), dtype=np.float64))
    except Exception as exc:
        raise ModelLoadError("probe_failed",
                             f"{uri} fails on a probe row: {first_line(exc)}") from exc
    if not 0 <= int(labels[0]) < model.n_clusters:
        raise ModelLoadError("probe_failed",
                             f"{uri} predicts cluster {int(labels[0])} for a probe row")
    return model


def bookkeeping_mismatches(model: LoadedModel, bookkeeping: Bookkeeping | None
                           ) -> dict[str, str]:
    """Where the clusters row's description disagrees with the model: logged, never a gate."""
    if bookkeeping is None:
        return {}
    found: dict[str, str] = {}
    if bookkeeping.n_clusters is not None and bookkeeping.n_clusters != model.n_clusters:
        found["n_clusters"] = (f"the row says {bookkeeping.n_clusters} clusters, the model has "
                               f"{model.n_clusters}")
    s = bookkeeping.silhouette
    if s is not None and not (math.isfinite(s) and -1.0 <= s <= 1.0):
        found["silhouette_score"] = f"{s} is not a silhouette score (-1 to 1)"
    if bookkeeping.profiles is not None:
        sets = profile_feature_sets(bookkeeping.profiles)
        if len(sets) != model.n_clusters:
            found["cluster_profiles"] = (f"{len(sets)} profiles for {model.n_clusters} "
                                         "clusters")
        expected = frozenset(model.model_features or model.feature_names)
        odd = [i for i, names in enumerate(sets) if names != expected]
        if odd:
            found["cluster_profile_features"] = (
                f"{len(odd)} of {len(sets)} profiles do not name the model's "
                f"{len(expected)} features")
    return found


def _cluster_count(pipeline: Any) -> int | None:
    final = pipeline.steps[-1][1] if hasattr(pipeline, "steps") else pipeline
    centers = getattr(final, "cluster_centers_", None)
    if centers is not None:
        return len(centers)
    n = getattr(final, "n_clusters", None)
    return int(n) if isinstance(n, int) else None


async def _check_features_in_readings(pool: asyncpg.Pool, names: Sequence[str]) -> None:
    """Refuse a model whose features the readings do not carry: it could score nothing."""
    rows = await pool.fetch(db.queries()["recent_readings_have_features"], list(names),
                            FEATURE_CHECK_SAMPLE)
    if not rows:
        return
    share = sum(1 for r in rows if r["has_all"]) / len(rows)
    if share < FEATURE_CHECK_MIN_SHARE:
        raise ModelLoadError(
            "feature_mismatch",
            f"only {share:.0%} of the latest {len(rows)} readings carry every feature the "
            f"model needs ({', '.join(names[:3])}...)")


async def check_digest(conn: asyncpg.Pool | asyncpg.Connection, model: LoadedModel) -> None:
    """Record the model's artifact digest when it is first served; refuse it when the digest
    on record for the same run and version differs (its artifacts changed in MLflow)."""
    recorded = await model_sources.record_digest(conn, model.run_id, model.version,
                                                 model.artifact_digest)
    if recorded is not None:
        raise ModelLoadError(
            "artifacts_changed",
            f"the artifacts of run {model.run_id} version {model.version} changed since it was "
            f"first served ({recorded[:19]}..., now {str(model.artifact_digest)[:19]}...): "
            "refused; log a new run instead of rewriting one")


def entry_of(model: LoadedModel) -> CacheEntry | None:
    """The model's numpy form, as cached and as the fetch process hands it back; None for a
    model that predicts through scikit-learn."""
    if model.kernel is None:
        return None
    return CacheEntry(
        run_id=model.run_id, registered_version=model.row.registered_version,
        version_label=model.version, feature_names=model.feature_names,
        model_features=model.model_features, n_clusters=model.n_clusters,
        reference=model.reference, legacy=model.legacy, kernel=model.kernel.to_arrays(),
        artifact_digest=model.artifact_digest,
        feature_reference=(None if model.feature_reference is None
                           else model.feature_reference.to_json()))


def fetch_here(row: ActiveRow, model_name: str, bookkeeping: Bookkeeping | None,
               sources: SourcePolicy | None) -> LoadedModel:
    """Blocking: what a fetch process and then the worker do with its answer, in this process:
    fetched and verified, then served from its numpy form (the one the cache stores), so a model
    is served the same way whichever path brought it."""
    model = load_and_verify(row, model_name, bookkeeping, sources)
    entry = entry_of(model)
    if entry is None:
        return model  # no numpy form: served by scikit-learn, as from a fetch process
    try:
        served = model_from_entry(row, model_name, entry, source="mlflow")
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelLoadError("load_failed", f"the fetched model does not fit: {exc}") from exc
    return replace(served, unpickled=model.unpickled)


def model_from_entry(row: ActiveRow, model_name: str, entry: CacheEntry, source: str
                     ) -> LoadedModel:
    """The model of a numpy form (entry_of), built with numpy alone and verified on a probe
    row; ValueError, TypeError, KeyError or ModelLoadError when the form does not hold."""
    kernel = KMeansKernel.from_arrays(entry.kernel)
    if kernel.n_inputs != len(entry.feature_names) or kernel.n_clusters != entry.n_clusters:
        raise ValueError("its arrays do not fit its feature names and clusters")
    model = LoadedModel(
        row=row, model_name=model_name, feature_names=entry.feature_names,
        n_clusters=entry.n_clusters, reference=entry.reference,
        read_query=db.read_range_query(entry.feature_names), kernel=kernel,
        legacy=entry.legacy, model_features=entry.model_features, source=source,
        artifact_digest=entry.artifact_digest,
        feature_reference=feature_reference(entry.feature_reference, entry.feature_names,
                                            kernel, model_features=entry.model_features))
    return _verified(model, f"{source} {row.run_id}")


def _tracking_uri() -> str:
    """The tracking URI of a holder given no source policy: MLflow's when this process has
    imported it (a test, a tool), else the environment's (configure_mlflow)."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        return str(mlflow.get_tracking_uri())
    return os.environ.get("MLFLOW_TRACKING_URI", "")


class ModelHolder:
    """Holds the served model; `refresh` follows the clusters table, with backoff on failure.

    With a `cache`, a model verified once is served again from it (a restart, a rollback)
    without MLflow; one fetched from MLflow is stored in it once it serves.
    """

    def __init__(self, model_name: str, *, on_failure: Any = None,
                 cache: ModelCache | None = None, role: str = "active",
                 reference: Callable[[], str | None] | None = None,
                 sources: SourcePolicy | None = None,
                 fetch_timeout: float = model_fetch.FETCH_TIMEOUT_SECONDS) -> None:
        """`role` "active" follows the active clusters row; "candidate" the shadow candidate
        (model_candidates): aligned against `reference()` (the active model's version), and
        neither marked served nor reported as a swap."""
        if role not in ("active", "candidate"):
            raise ValueError(f"role must be 'active' or 'candidate', got {role!r}")
        self.role = role
        self._reference = reference
        self.sources = sources  # None: the tracking URI's own (model_sources.default_sources)
        self.fetch_timeout = fetch_timeout  # a fetch process running longer is killed
        # Fetch in a thread of this process instead of a child: only where this process has
        # imported MLflow and scikit-learn anyway (the demo, which trains its models in it), so
        # that a child's import of them again (5-10 s a swap) buys nothing.
        self.fetch_in_thread = False
        # A fetch process started ahead of need (the worker's, once it serves a model).
        self.standby: model_fetch.Standby | None = None
        self.model_name = model_name
        self.current: LoadedModel | None = None
        self.cache = cache
        self._lock = asyncio.Lock()
        self._failed_row: ActiveRow | None = None
        self._failures = 0
        self.retry_at: float | None = None  # monotonic time of the next attempt after a failure
        self.last_seen_row: ActiveRow | None = None
        self._on_failure = on_failure
        self._legacy_announced: set[tuple[str, int | None]] = set()

    async def active_row(self, pool: asyncpg.Pool) -> ActiveRow | None:
        q = db.queries()
        r = await pool.fetchrow(q["active_model"] if self.role == "active"
                                else q["shadow_candidate"])
        if r is None:
            return None
        return ActiveRow(int(r["id"]), r["mlflow_run_id"], r["mlflow_model_version"],
                         r["n_clusters"])

    async def bookkeeping(self, pool: asyncpg.Pool, row: ActiveRow) -> Bookkeeping:
        r = await pool.fetchrow(db.queries()["model_bookkeeping"], row.id)
        profiles: Any = None
        if r is not None and r["cluster_profiles"] is not None:
            try:
                profiles = json.loads(r["cluster_profiles"])
            except ValueError:
                profiles = None
        return Bookkeeping(
            n_clusters=row.n_clusters,
            silhouette=None if r is None or r["silhouette_score"] is None
            else float(r["silhouette_score"]),
            profiles=profiles if isinstance(profiles, Mapping) else None)

    async def refresh(self, pool: asyncpg.Pool) -> bool:
        """Serve the newest active row's model if it is not served yet; True when swapped."""
        async with self._lock:
            row = await self.active_row(pool)
            self.last_seen_row = row  # what the database says is active (the mismatch gauge)
            current_row = self.current.row if self.current else None
            if row == current_row:
                self.retry_at = None
                return False
            if row is None:
                if self.role == "active":
                    log.warning("model_deactivated", previous_version=self.current.version
                                if self.current else None,
                                note="no clusters row is active: scoring pauses, readings wait")
                else:
                    log.info("shadow_candidate_stopped", model_version=self.current.version
                             if self.current else None)
                self.current = None
                return True
            if row == self._failed_row and self.retry_at is not None \
                    and time.monotonic() < self.retry_at:
                return False
            started = time.perf_counter()
            try:
                bookkeeping = (await self.bookkeeping(pool, row) if self.role == "active"
                               else Bookkeeping())  # a candidate has no clusters row yet
                model = self._from_cache(row) or await self._fetched(row, bookkeeping)
                await _check_features_in_readings(pool, model.feature_names)
                await check_digest(pool, model)
                model = await self._aligned(pool, model)
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
            log.info("model_swapped" if self.role == "active" else "shadow_candidate_loaded",
                     model_version=model.version, run_id=model.run_id,
                     clusters_row=row.id, n_clusters=model.n_clusters,
                     features=len(model.feature_names), source=model.source,
                     layout="legacy" if model.legacy else "pipeline",
                     fast_path=model.kernel is not None, unpickled=model.unpickled,
                     previous_version=previous.version if previous else None,
                     load_ms=round((time.perf_counter() - started) * 1000, 1))
            self._announce(model, bookkeeping)
            if model.source != "cache" and self.cache is not None:
                await asyncio.to_thread(self._store, model)
            if self.role == "candidate":
                return True  # the active model stays the reference; no notice is its own
            try:  # the reference for the next model's alignment; never fatal
                await cluster_registry.mark_served(pool, model.version)
            except asyncpg.PostgresError as exc:
                log.warning("served_not_marked", error=str(exc))
            try:
                await pool.execute(db.queries()["mark_versions_processed"], row.run_id)
            except asyncpg.PostgresError as exc:  # bookkeeping for old tools; never fatal
                log.warning("versions_not_marked", error=str(exc))
            return True

    async def _aligned(self, pool: asyncpg.Pool, model: LoadedModel) -> LoadedModel:
        """The model with its stable cluster ids, aligned (the first time it is used) against
        the model it replaces."""
        if self._reference is not None:
            reference = self._reference()
        else:
            reference = self.current.version if self.current is not None else None
        lookup = await cluster_registry.ensure_aligned(pool, model, reference)
        return replace(model, stable_ids=lookup)

    def _from_cache(self, row: ActiveRow) -> LoadedModel | None:
        if self.cache is None:
            return None
        entry = self.cache.load(row.run_id, row.registered_version)
        if entry is None:
            return None
        try:
            model = model_from_entry(row, self.model_name, entry, source="cache")
        except (ValueError, TypeError, KeyError, ModelLoadError) as exc:
            self.cache.discard(row.run_id, row.registered_version, str(exc))
            return None
        log.info("model_served_from_cache", run_id=row.run_id, model_version=model.version,
                 path=str(self.cache.path(row.run_id, row.registered_version)))
        return model

    async def _fetched(self, row: ActiveRow, bookkeeping: Bookkeeping) -> LoadedModel:
        """The model from MLflow, fetched and verified by a child process (model_fetch.py);
        in a thread of this process only when it has no numpy form."""
        if self.fetch_in_thread:
            # A daemon thread: a hung fetch never holds a shutdown up (faults.py).
            return await in_daemon_thread(  # type: ignore[no-any-return]
                fetch_here, row, self.model_name, bookkeeping, self.sources)
        policy = self.sources or SourcePolicy(_tracking_uri())
        fetched = await model_fetch.fetch(row, self.model_name, bookkeeping, policy,
                                          self.fetch_timeout, self.standby)
        if fetched.entry is not None:
            try:
                model = model_from_entry(row, self.model_name, fetched.entry, source="mlflow")
            except (ValueError, TypeError, KeyError) as exc:
                raise ModelLoadError("load_failed", f"the model fetch process handed back a "
                                                    f"model that does not fit: {exc}") from exc
            return replace(model, unpickled=fetched.unpickled)
        log.warning("model_needs_scikit_learn", run_id=row.run_id,
                    model_version=row.model_version,
                    note="not a StandardScaler + KMeans (no numpy form): loaded into the "
                         "worker, which holds scikit-learn and MLflow from now on")
        # A daemon thread: a hung fetch never holds a shutdown up (faults.py).
        return await in_daemon_thread(  # type: ignore[no-any-return]
            load_and_verify, row, self.model_name, bookkeeping, self.sources)

    def _store(self, model: LoadedModel) -> None:
        entry = entry_of(model)
        if self.cache is None or entry is None:
            return  # only what numpy alone can serve is worth a restart without MLflow
        self.cache.store(entry)

    def _announce(self, model: LoadedModel, bookkeeping: Bookkeeping) -> None:
        mismatches = bookkeeping_mismatches(model, bookkeeping)
        if mismatches:
            log.warning("model_bookkeeping_mismatch", run_id=model.run_id,
                        model_version=model.version, clusters_row=model.row.id,
                        note="the clusters row describes the model; it does not gate it: "
                             "serving the model", **mismatches)
        key = (model.run_id, model.row.registered_version)
        if model.legacy and key not in self._legacy_announced:
            self._legacy_announced.add(key)
            log.warning(
                "legacy_model_served", run_id=model.run_id, model_version=model.version,
                sensors=len(model.feature_names), model_features=len(model.model_features),
                note="a model of the old trainer, fitted on failure-episode aggregates, scores "
                     "single readings (value for _mean/_min/_max, 0 for _std and duration) as "
                     "the old predictor did; retrain with `sensor-predictor train` (docs/"
                     "replacing-the-old-predictor.md: Serving the old trainer's models)")

    def _record_failure(self, row: ActiveRow, reason: str, message: str) -> None:
        self._failures = self._failures + 1 if row == self._failed_row else 1
        self._failed_row = row
        delay = min(60.0, 1.0 * 2 ** (self._failures - 1))
        self.retry_at = time.monotonic() + delay
        log.error("model_load_failed" if self.role == "active" else "shadow_candidate_load_failed",
                  reason=reason, error=message, run_id=row.run_id,
                  clusters_row=row.id, attempt=self._failures, retry_in_s=delay,
                  serving=self.current.version if self.current else None)
        if self._on_failure is not None:
            self._on_failure(reason)


def configure_mlflow(tracking_uri: str) -> None:
    """Point MLflow at the tracking server, failing fast rather than retrying for minutes.

    MLflow is not imported here (its import, with scikit-learn's, is most of a cold start): the
    settings go to the environment, where MLflow reads them when a model is first fetched.
    """
    # MLflow's defaults retry an unreachable server for minutes; a swap then hangs that long.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    # A worker has no business phoning a third party; an operator can still opt in.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:  # already imported (the demo, a test): its URI is set explicitly
        mlflow.set_tracking_uri(tracking_uri)
