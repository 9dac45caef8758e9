"""The drop-in promise, end to end: a database the old system created and filled, its trainer's
models in their old layout, its consumer writing throughout; then our `migrate` and `run`."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import numpy as np
import pytest
import pytest_asyncio

from sensor_predictor.devtools import legacy_trainer, old_system
from sensor_predictor.devtools.mlflow_server import MlflowServer, mlflow_env
from sensor_predictor.devtools.postgres import PgServer, create_database
from sensor_predictor.devtools.tally import tally
from sensor_predictor.devtools.worker_process import WorkerProcess
from tests.support.databases import drop_later
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

HISTORY = 3_000  # readings the old system wrote before we arrive


@pytest_asyncio.fixture
async def old_db(pg_server: PgServer) -> AsyncIterator[str]:
    name = f"sp_dropin_{uuid.uuid4().hex[:10]}"
    await create_database(pg_server, name)
    yield name
    drop_later(pg_server, name)


def _log_legacy(store: MlflowServer, seed: int, clusters: int
                ) -> tuple[str, int, dict[str, object], float]:
    rnd = np.random.default_rng(seed)
    readings = rnd.normal(size=(400, 20)) + np.repeat(np.arange(4), 100)[:, None] * 1.5
    run_id, version, profiles = legacy_trainer.log_legacy_model(
        store.uri, readings, n_clusters=clusters, seed=seed)
    return run_id, version, profiles, 0.5


class OldConsumer:
    """The old consumer, writing one message per transaction until stopped."""

    def __init__(self, server: PgServer, database: str) -> None:
        self.server, self.database = server, database
        self.written: list[int] = []
        self.errors: list[BaseException] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> OldConsumer:
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        conn = await self.server.connect(self.database)
        consumer = old_system.Consumer(conn)
        rnd = random.Random(9)
        try:
            while not self._stop.is_set():
                machine = f"machine-{rnd.randrange(4)}"
                failing = rnd.random() < 0.1
                try:
                    self.written.append(await consumer.write(
                        machine, old_system.message(rnd), has_failure=failing))
                except asyncpg.PostgresError as exc:  # counted: the test requires none
                    self.errors.append(exc)
                await asyncio.sleep(0.01)
        finally:
            await conn.close()

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task


async def _scored_everything(conn: asyncpg.Connection) -> bool:
    t = await tally(conn)
    return t.missing == 0


@pytest.mark.timeout(400)
async def test_the_old_systems_database_and_models_are_taken_over_without_a_gap(
        pg_server: PgServer, old_db: str, mlflow_server: MlflowServer, tmp_path: Path) -> None:
    conn = await pg_server.connect(old_db)
    # 1. The old system at work: its schema, months of history, its predictor's results for
    #    part of it, and its trainer's current model, activated the old trainer's way.
    await old_system.create_old_schema(conn)
    await old_system.bulk_history(conn, HISTORY, machines=4, failure_share=0.15)
    run1, v1, profiles1, silhouette1 = await asyncio.to_thread(_log_legacy, mlflow_server, 1, 4)
    await old_system.old_predictions(conn, str(v1), run1, share=0.6)
    old_rows = {r["reading_id"]: dict(r) for r in await conn.fetch(
        "SELECT * FROM predictions ORDER BY id")}
    assert old_rows
    await legacy_trainer.activate_like_old_trainer(conn, run1, v1, 4, silhouette1, profiles1)
    consumer = OldConsumer(pg_server, old_db).start()
    await asyncio.sleep(0.5)

    # 2. Ours: `migrate`, then `run`, with the consumer writing all along.
    env = {**pg_server.env(old_db), **mlflow_env(mlflow_server.uri),
           "MODEL_CACHE_DIR": str(tmp_path / "model-cache"), "LOG_FORMAT": "json",
           "INFERENCE_INTERVAL_SECONDS": "30", "HEARTBEAT_SECONDS": "1"}
    migrated = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "sensor_predictor.cli", "migrate"],
        env={**_base_env(), **env}, capture_output=True, text=True, timeout=120)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert "adopting_existing_tables" in migrated.stdout + migrated.stderr
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        await worker.until_ready()
        events = worker.events()
        assert any(e.get("event") == "legacy_model_served" for e in events), worker.logs()
        # The adopted backlog drains while the consumer writes.
        assert await wait_for(lambda: _scored_everything(conn), timeout=60), \
            (await tally(conn), worker.logs()[-3000:])

        # 3. The old trainer's next hourly retrain: another old-layout model, two statements.
        run2, v2, profiles2, silhouette2 = await asyncio.to_thread(
            _log_legacy, mlflow_server, 2, 3)
        await legacy_trainer.activate_like_old_trainer(conn, run2, v2, 3, silhouette2, profiles2)
        swapped_at = time.monotonic()

        async def serving_v2() -> bool:
            return bool(await conn.fetchval(
                "SELECT count(*) FROM predictions WHERE model_version = $1", str(v2)))

        assert await wait_for(serving_v2, timeout=60), worker.logs()[-3000:]
        swap_s = time.monotonic() - swapped_at
        await asyncio.sleep(1.0)
        await consumer.stop()
        assert await wait_for(lambda: _scored_everything(conn), timeout=30)
    finally:
        if consumer._task is not None and not consumer._task.done():
            await consumer.stop()
        worker.stop()

    # 4. What the user checks.
    assert consumer.errors == [], consumer.errors[:3]
    assert len(consumer.written) > 50
    t = await tally(conn)
    assert t.exactly_once, t
    assert t.readings == HISTORY + len(consumer.written)
    # The old predictions are untouched, and those readings were not scored again.
    now_rows = {r["reading_id"]: dict(r) for r in await conn.fetch(
        "SELECT * FROM predictions WHERE reading_id = ANY($1::int[])", list(old_rows))}
    assert now_rows.keys() == old_rows.keys()
    for reading_id, old in old_rows.items():  # every old column unchanged (ours are added)
        assert {k: now_rows[reading_id][k] for k in old} == old
    # Readings taken during failure episodes, never scored by the old predictor, are now.
    assert await conn.fetchval(
        "SELECT count(*) FROM readings r WHERE failure_id IS NOT NULL AND NOT EXISTS"
        " (SELECT 1 FROM predictions p WHERE p.reading_id = r.id)") == 0
    # The legacy model's cluster ids are what the old predictor's mapping gives, in the
    # trainer's column order (not jsonb's), for the very same readings.
    for run_id, version in ((run1, v1), (run2, v2)):
        scaler, kmeans, order = await asyncio.to_thread(
            legacy_trainer.fetch_legacy_parts, mlflow_server.uri, run_id)
        rows = await conn.fetch(
            'SELECT r."values"::text AS v, p.model_label, p.cluster_id FROM predictions p'
            " JOIN readings r ON r.id = p.reading_id"
            " WHERE p.model_version = $1 AND p.reading_id <> ALL($2::int[])",
            str(version), list(old_rows))
        assert rows
        expected = legacy_trainer.old_predictor_labels(
            scaler, kmeans, order, [json.loads(r["v"]) for r in rows])
        assert [r["model_label"] for r in rows] == expected.tolist()
        # cluster_id carries the stable id: the model's label through its stored mapping.
        mapping = dict(await conn.fetch(
            "SELECT label, stable_id FROM cluster_ids WHERE model_version = $1", str(version)))
        assert [r["cluster_id"] for r in rows] == [mapping[x] for x in expected.tolist()]
    # The old trainer's notice of the model served from the start is marked processed.
    assert await conn.fetchval("SELECT is_processed FROM versions WHERE run_id = $1", run1)
    await conn.close()
    print(f"swap to the retrained legacy model: {swap_s:.2f} s")


def _base_env() -> dict[str, str]:
    import os

    return dict(os.environ)
