"""Re-scoring history with a chosen model: a separate, explicit job, never done by a swap."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

import structlog

from sensor_predictor import cluster_registry, db, features
from sensor_predictor.config import Settings
from sensor_predictor.model_holder import check_digest, configure_mlflow, load_and_verify
from sensor_predictor.model_sources import SourcePolicy
from sensor_predictor.model_types import ActiveRow

log = structlog.get_logger("sensor_predictor.rescore")


@dataclass(frozen=True)
class RescoreResult:
    model_version: str
    readings: int  # readings read
    predicted: int  # predictions written (a reading this version already scored is skipped)
    errors: int  # bad readings recorded for this version
    last_id: int | None


async def rescore(settings: Settings, *, run_id: str, version: int | None, from_id: int = 0,
                  to_id: int | None = None, batch_size: int = 1000) -> RescoreResult:
    """Score readings with id in (from_id, to_id] with the model of `run_id`; resumable."""
    configure_mlflow(settings.mlflow_tracking_uri)
    row = ActiveRow(id=0, run_id=run_id, registered_version=version, n_clusters=None)
    sources = SourcePolicy(settings.mlflow_tracking_uri, settings.model_sources_allowed)
    model = await asyncio.to_thread(load_and_verify, row, settings.model_name, None, sources)
    q = db.queries()
    conn = await db.connect(settings, timeout=30)
    read = predicted = errors = 0
    last: int | None = None
    cursor = from_id
    try:
        # History speaks the same stable ids as the live stream: the model's mapping, aligned
        # now against the model served last if this is its first use.
        await check_digest(conn, model)  # the artifacts it was first served from, unchanged
        model = replace(model, stable_ids=await cluster_registry.ensure_aligned(conn, model))
        while True:
            rows = await conn.fetch(q["rescore_read"], cursor, to_id, batch_size)
            if not rows:
                break
            ids, matrix, bad = features.parse_raw([(r["id"], r["raw"]) for r in rows],
                                                  model.feature_names)
            labels, confidence = model.predict(matrix)
            conf = confidence.tolist() if confidence is not None else [None] * len(ids)
            async with conn.transaction():
                predicted += await conn.fetchval(
                    q["rescore_insert_predictions"], ids, model.stable(labels).tolist(), conf,
                    model.version, model.run_id, model.model_name, labels.tolist())
                if bad:
                    errors += await conn.fetchval(
                        q["rescore_insert_errors"], [b.reading_id for b in bad],
                        [b.reason for b in bad], [b.detail for b in bad], model.version)
            read += len(rows)
            cursor = last = int(rows[-1]["id"])
            log.info("rescore_progress", model_version=model.version, readings=read,
                     predicted=predicted, last_id=last)
    finally:
        await conn.close()
    return RescoreResult(model.version, read, predicted, errors, last)
