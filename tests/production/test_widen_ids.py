"""`sensor-predictor widen-ids` on a database adopted from the old system, while the old
consumer writes and our worker scores: the data unchanged, exactly once, no writer stalled a
second, and the old ORM and the old trainer's statements still work afterwards. Also the
sensor_id_headroom_ratio warning the worker logs on the integer ids before."""

from __future__ import annotations

import asyncio
import os
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

from sensor_predictor import db
from sensor_predictor.devtools import legacy_trainer, old_system
from sensor_predictor.devtools.mlflow_server import MlflowServer, mlflow_env
from sensor_predictor.devtools.postgres import PgServer, create_database, drop_database
from sensor_predictor.devtools.tally import tally
from sensor_predictor.devtools.worker_process import WorkerProcess
from sensor_predictor.widen_ids import headroom
from tests.support import old_orm
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

HISTORY = 10_000
INT_MAX = 2**31 - 1
# Where the readings' sequence is moved to: ids above 2^30 (headroom under a half, so the
# worker warns) and a gap the backfill must not walk id by id.
READINGS_FROM = 1_200_000_000


@pytest_asyncio.fixture
async def old_db(pg_server: PgServer) -> AsyncIterator[str]:
    name = f"sp_widen_{uuid.uuid4().hex[:10]}"
    await create_database(pg_server, name)
    yield name
    await drop_database(pg_server, name)


class TimedConsumer:
    """The old consumer, one message per transaction, each write timed (a stall is the
    longest write)."""

    def __init__(self, server: PgServer, database: str) -> None:
        self.server, self.database = server, database
        self.written: list[int] = []
        self.errors: list[BaseException] = []
        self.durations: list[tuple[float, float]] = []  # (started, seconds)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> TimedConsumer:
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        conn = await self.server.connect(self.database)
        consumer = old_system.Consumer(conn)
        rnd = random.Random(7)
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    self.written.append(await consumer.write(
                        f"machine-{rnd.randrange(4)}", old_system.message(rnd),
                        has_failure=rnd.random() < 0.1))
                except asyncpg.PostgresError as exc:
                    self.errors.append(exc)
                self.durations.append((started, time.monotonic() - started))
                await asyncio.sleep(0.005)
        finally:
            await conn.close()

    def longest(self, since: float, until: float) -> float:
        return max((d for s, d in self.durations if since <= s <= until), default=0.0)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


async def _fingerprints(conn: asyncpg.Connection, table: str) -> dict[int, str]:
    cols = {"readings": '"timestamp", "values", failure_id, machine_id',
            "predictions": "reading_id, cluster_id, model_version, mlflow_run_id"}[table]
    return {r["id"]: r["f"] for r in await conn.fetch(
        f"SELECT id, md5(concat_ws('|', {cols})) AS f FROM {table}")}


def _legacy_model(store: MlflowServer) -> tuple[str, int, dict[str, object], float]:
    rnd = np.random.default_rng(1)
    readings = rnd.normal(size=(400, 20)) + np.repeat(np.arange(4), 100)[:, None] * 1.5
    run_id, version, profiles = legacy_trainer.log_legacy_model(
        store.uri, readings, n_clusters=4, seed=1)
    return run_id, version, profiles, 0.5


@pytest.mark.timeout(400)
async def test_widen_ids_online_under_the_old_consumers_writes(
        pg_server: PgServer, old_db: str, mlflow_server: MlflowServer, tmp_path: Path) -> None:
    conn = await pg_server.connect(old_db)
    await old_system.create_old_schema(conn)
    await old_system.bulk_history(conn, HISTORY, machines=4)
    run_id, version, profiles, silhouette = await asyncio.to_thread(_legacy_model, mlflow_server)
    await old_system.old_predictions(conn, str(version), run_id, share=0.6)
    await legacy_trainer.activate_like_old_trainer(conn, run_id, version, 4, silhouette, profiles)

    env = {**pg_server.env(old_db), **mlflow_env(mlflow_server.uri),
           "MODEL_CACHE_DIR": str(tmp_path / "model-cache"), "LOG_FORMAT": "json",
           "INFERENCE_INTERVAL_SECONDS": "30", "HEARTBEAT_SECONDS": "1"}
    consumer = TimedConsumer(pg_server, old_db).start()
    worker = WorkerProcess(env, tmp_path / "worker.log").start()  # migrates on start
    try:
        await worker.until_ready()
        assert await wait_for(lambda: _drained(conn), timeout=90), \
            (await tally(conn), worker.logs()[-3000:])
        # The readings' sequence moves on, as on a database that has lived a while: integer
        # ids past 2^30. The gauge's query says so, the worker warns.
        await conn.execute(f"SELECT setval('readings_id_seq', {READINGS_FROM})")
        before = {r["tbl"]: headroom(r["id_max"], r["id_used"])
                  for r in await conn.fetch(db.queries()["id_headroom"])}
        assert 0.4 < before["readings"] < 0.5 and before["predictions"] > 0.99, before
        assert await wait_for(lambda: _warned(worker), timeout=30), worker.logs()[-3000:]
        gauge = worker.metric("sensor_id_headroom_ratio", 'table="readings"')
        assert gauge is not None and 0.4 < gauge < 0.5, gauge
        assert await wait_for(lambda: _drained(conn), timeout=30), \
            (await tally(conn), worker.logs()[-3000:])
        readings_before = await _fingerprints(conn, "readings")
        predictions_before = await _fingerprints(conn, "predictions")

        # widen-ids, the real command, while both keep writing.
        started = time.monotonic()
        widened = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "sensor_predictor.cli", "widen-ids",
                             "--batch-size", "5000"],
            env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
        ended = time.monotonic()
        assert widened.returncode == 0, widened.stdout + widened.stderr
        assert "widened=readings.id,predictions.id,predictions.reading_id" in widened.stdout
        written_during = sum(1 for s, _ in consumer.durations if started <= s <= ended)
        stall = consumer.longest(started, ended)

        await asyncio.sleep(1.0)
        await consumer.stop()
        assert await wait_for(lambda: _drained(conn), timeout=60), \
            (await tally(conn), worker.logs()[-3000:])
    finally:
        await consumer.stop()
        worker.stop()

    # The ids are bigint, everything that was there is unchanged, the constraints hold.
    types = {(r["tbl"], r["col"]): r["t"] for r in await conn.fetch(
        "SELECT c.relname AS tbl, a.attname AS col, format_type(a.atttypid, NULL) AS t"
        "  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
        " WHERE c.relname IN ('readings', 'predictions') AND a.attname IN ('id', 'reading_id')")}
    assert set(types.values()) == {"bigint"}, types
    assert await conn.fetchval(
        "SELECT count(*) FROM pg_constraint WHERE NOT convalidated") == 0
    assert await conn.fetchval("SELECT count(*) FROM pg_proc WHERE proname LIKE 'sp_widen%'") == 0
    readings_after = await _fingerprints(conn, "readings")
    predictions_after = await _fingerprints(conn, "predictions")
    assert {k: readings_after.get(k) for k in readings_before} == readings_before
    assert {k: predictions_after.get(k) for k in predictions_before} == predictions_before
    t = await tally(conn)
    assert t.exactly_once, t
    assert await conn.fetchval(
        "SELECT data_type FROM pg_sequences WHERE sequencename = 'readings_id_seq'") == "bigint"

    # No writer stalled a second; the old consumer lost nothing.
    assert written_during > 20, written_during
    assert stall < 1.0, stall
    assert all(i in readings_after for i in consumer.written)

    # The old ORM and the old trainer afterwards (the ORM's id fields are IntField: values
    # above 2^31 would not fit its declaration, but today's ids do).
    dsn = f"postgres://{pg_server.user}@{pg_server.host}:{pg_server.port}/{old_db}"
    await old_orm.generate_schemas(dsn)
    new_id = await old_orm.orm_write_reading(dsn, "machine-orm",
                                             old_system.message(random.Random(3)))
    assert new_id > READINGS_FROM
    await legacy_trainer.activate_like_old_trainer(conn, f"{run_id[:30]}-next", version + 1, 4,
                                                   silhouette, profiles)
    episodes = await conn.fetchval(
        "SELECT count(*) FROM readings r JOIN failures f ON f.id = r.failure_id")
    assert episodes > 0
    await conn.execute(
        "INSERT INTO predictions (cluster_id, model_version, reading_id, prediction_time,"
        " model_name) VALUES (0, 'old', $1, now(), 'x')", new_id)

    # Run again: nothing left to do.
    again = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "sensor_predictor.cli", "widen-ids"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "widened=none" in again.stdout, again.stdout + again.stderr
    await conn.close()
    print(f"widen-ids: {ended - started:.1f} s, longest consumer write {stall * 1000:.0f} ms, "
          f"{written_during} writes during, consumer errors {consumer.errors!r}")
    # What no online change of a column's type avoids: a client that cached a prepared
    # statement returning the id (the consumer's INSERT ... RETURNING "id") gets one "cached
    # plan must not change result type" per connection, inside a transaction (asyncpg
    # prepares it again by itself outside one). That message's transaction fails once; the
    # next one succeeds (written above: the consumer wrote on afterwards).
    assert len(consumer.errors) <= 1, consumer.errors
    assert all(isinstance(e, asyncpg.InvalidCachedStatementError) for e in consumer.errors)


async def _warned(worker: WorkerProcess) -> bool:
    return any(e.get("event") == "id_headroom_low" and e.get("table") == "readings"
               and e.get("below") == 0.5 for e in worker.events())


async def _drained(conn: asyncpg.Connection) -> bool:
    return (await tally(conn)).missing == 0
