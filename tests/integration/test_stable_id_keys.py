"""The stable-id mapping belongs to (run id, version), never to the version label alone
(issue 23, finding 7): a hand activation that reuses a version label for another run is refused
loudly, never served with another model's mapping."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from sensor_predictor import cluster_registry, db
from sensor_predictor.config import load_settings
from sensor_predictor.model_holder import ModelHolder, configure_mlflow, load_and_verify
from sensor_predictor.model_types import ActiveRow, ModelLoadError
from sensor_predictor.training import activate_model
from tests.support.databases import Database
from tests.support.models import Models

pytestmark = pytest.mark.asyncio


async def test_a_version_label_reused_for_another_run_is_refused(
        database: Database, conn: asyncpg.Connection, models: Models) -> None:
    configure_mlflow(models.store.uri)
    run_1, version_1 = models.v1
    run_2, _ = models.v2
    first = await asyncio.to_thread(load_and_verify, ActiveRow(0, run_1, version_1, None), "m")
    assert (await cluster_registry.ensure_aligned(conn, first)).tolist() == [0, 1, 2, 3]
    # Another run, activated by hand under the same version label.
    impostor = await asyncio.to_thread(load_and_verify, ActiveRow(0, run_2, version_1, None),
                                       "m")
    with pytest.raises(ModelLoadError) as refused:
        await cluster_registry.ensure_aligned(conn, impostor)
    assert refused.value.reason == "cluster_mapping_mismatch"
    assert run_1 in str(refused.value) and run_2 in str(refused.value)
    # Its own mapping is still there and still served to its own run.
    assert (await cluster_registry.ensure_aligned(conn, first)).tolist() == [0, 1, 2, 3]

    # A worker keeps serving what it served, and says why (a failure by reason).
    failures: list[str] = []
    holder = ModelHolder("m", on_failure=failures.append)
    pool = await db.create_pool(load_settings(database.env()), size=2)
    try:
        await activate_model(conn, run_1, version_1)
        assert await holder.refresh(pool)
        await activate_model(conn, run_2, version_1)
        assert not await holder.refresh(pool)
        assert holder.current is not None and holder.current.run_id == run_1
        assert failures == ["cluster_mapping_mismatch"]
    finally:
        await pool.close()
