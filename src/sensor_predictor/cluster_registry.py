"""The stable-id mapping of each model version, kept in PostgreSQL (cluster_models, cluster_ids).

A model is aligned the first time it is used (activation, shadow candidate, rescore) against the
model active at that moment: the model the worker serves, or else the model a worker served last
(`cluster_models.served_at`). The matching itself is cluster_ids.py; this module reads the
reference's centroids from the table, stores the result, and hands back a label -> stable id
array. Alignment runs under a transaction-level advisory lock, so two replicas aligning at once
agree on one mapping and fresh ids are never given twice.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import numpy as np
import numpy.typing as npt
import structlog

from sensor_predictor import cluster_ids, db
from sensor_predictor.cluster_ids import Alignment, Centroids
from sensor_predictor.model_types import LoadedModel

log = structlog.get_logger("sensor_predictor.clusters")

# A lock class of its own (the claims' is 21328, where every key is some claim's after enough
# claims: sp_claim_lock_key wraps at 2^31 - 1).
ALIGN_LOCK = (21329, 1)

Lookup = npt.NDArray[np.int64]


def model_centroids(model: LoadedModel) -> Centroids | None:
    """The model's centres in reading units over the features it reads; None without a numpy
    kernel (a pipeline that is not exactly StandardScaler + KMeans)."""
    kernel = model.kernel
    if kernel is None:
        return None
    centers = cluster_ids.reading_unit_centers(kernel.mean, kernel.scale, kernel.centers)
    scale = kernel.scale
    if model.legacy:
        cols = cluster_ids.episode_mean_columns(model.feature_names, model.model_features)
        centers, scale = centers[:, cols], scale[cols]
    return Centroids(tuple(model.feature_names), centers, float(np.linalg.norm(scale)))


@dataclass(frozen=True)
class ModelMapping:
    model_version: str
    run_id: str
    aligned_against: str | None
    aligned_at: object
    served_at: object
    rows: list[tuple[int, int, float | None]]  # (label, stable id, distance)


async def _reference(conn: asyncpg.Connection, version: str, preferred: str | None
                     ) -> tuple[str, Centroids | None, list[int]] | None:
    q = db.queries()
    ref = None
    if preferred is not None and preferred != version:
        ref = await conn.fetchrow(q["cluster_reference_named"], preferred)
    if ref is None:
        ref = await conn.fetchrow(q["cluster_reference_last_served"], version)
    if ref is None:
        return None
    rows = await conn.fetch(q["cluster_reference_centroids"], ref["model_version"])
    ids = [int(r["stable_id"]) for r in rows]
    if not rows or any(not r["centroid"] for r in rows):
        return ref["model_version"], None, ids
    centers = np.asarray([list(r["centroid"]) for r in rows], dtype=np.float64)
    return (ref["model_version"],
            Centroids(tuple(ref["feature_names"]), centers, float(ref["spread"])), ids)


async def ensure_aligned(pool: asyncpg.Pool | asyncpg.Connection, model: LoadedModel,
                         reference: str | None = None) -> Lookup:
    """The model's label -> stable id array: read from the table, or computed now (against
    `reference`, the model version active at this moment, when it is aligned; else the model
    served last) and stored."""
    if isinstance(pool, asyncpg.Pool):
        async with pool.acquire() as conn:
            return await _ensure_aligned(conn, model, reference)
    return await _ensure_aligned(pool, model, reference)


async def _ensure_aligned(conn: asyncpg.Connection, model: LoadedModel,
                          reference: str | None) -> Lookup:
    existing = await _stored(conn, model)
    if existing is not None:
        return existing
    # scipy.optimize takes a second or more to import: in a thread, never on the event loop.
    await asyncio.to_thread(importlib.import_module, "scipy.optimize")
    q = db.queries()
    async with conn.transaction():
        await conn.execute(q["cluster_align_lock"], *ALIGN_LOCK)
        existing = await _stored(conn, model)  # aligned by another replica meanwhile
        if existing is not None:
            return existing
        mine = model_centroids(model)
        next_id = int(await conn.fetchval(q["cluster_next_stable_id"]))
        found = await _reference(conn, model.version, reference)
        against = found[0] if found else None
        if found is None and next_id == 0:
            result: Alignment = cluster_ids.identity(model.n_clusters)
        elif found is None or found[1] is None or mine is None:
            result = cluster_ids.fresh_ids(model.n_clusters, next_id,
                                           found[2] if found else ())
        else:
            result = cluster_ids.align(mine, found[1], found[2], next_id)
        await conn.execute(
            q["cluster_model_insert"], model.version, model.run_id,
            list(mine.feature_names if mine else model.feature_names),
            mine.spread if mine else 0.0, against)
        centres: Sequence[Sequence[float]] = (mine.centers.tolist() if mine
                                              else [[] for _ in range(model.n_clusters)])
        await conn.executemany(
            q["cluster_id_insert"],
            [(model.version, label, sid, list(centres[label]), result.distances[label])
             for label, sid in enumerate(result.stable_ids)])
    log.info("clusters_aligned", model_version=model.version, run_id=model.run_id,
             aligned_against=against,
             mapping={str(label): sid for label, sid in enumerate(result.stable_ids)},
             fresh=list(result.fresh), retired=list(result.retired),
             compared="no centroids" if mine is None else f"{len(mine.feature_names)} features")
    return result.lookup()


async def _stored(conn: asyncpg.Connection, model: LoadedModel) -> Lookup | None:
    rows = await conn.fetch(db.queries()["cluster_stored_mapping"], model.version)
    if not rows:
        return None
    if [r["label"] for r in rows] != list(range(model.n_clusters)):
        log.error("cluster_mapping_mismatch", model_version=model.version,
                  stored_labels=len(rows), n_clusters=model.n_clusters,
                  note="the stored mapping does not fit the model (another model under this "
                       "version label?): its labels are written as they are")
        return np.arange(model.n_clusters, dtype=np.int64)
    return np.asarray([r["stable_id"] for r in rows], dtype=np.int64)


async def mark_served(pool: asyncpg.Pool, model_version: str) -> None:
    """The model is now the active one: the reference for the next model to be aligned."""
    await pool.execute(db.queries()["cluster_mark_served"], model_version)


async def mappings(conn: asyncpg.Connection) -> list[ModelMapping]:
    """Every stored mapping, oldest first (for `sensor-predictor clusters`)."""
    q = db.queries()
    models = await conn.fetch(q["cluster_models_all"])
    ids = await conn.fetch(q["cluster_ids_all"])
    by_version: dict[str, list[tuple[int, int, float | None]]] = {}
    for r in ids:
        by_version.setdefault(r["model_version"], []).append(
            (int(r["label"]), int(r["stable_id"]), r["distance"]))
    return [ModelMapping(m["model_version"], m["mlflow_run_id"], m["aligned_against"],
                         m["aligned_at"], m["served_at"], by_version.get(m["model_version"], []))
            for m in models]
