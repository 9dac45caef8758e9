"""Migrations on an empty database, the schema they leave, and the triggers' signals."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio

from sensor_predictor.devtools.postgres import PgServer
from sensor_predictor.migrate import load_migrations, migrate
from tests.support.databases import Database, drop_later
from tests.support.readings import insert_readings, reading

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def empty_db(pg_server: PgServer) -> AsyncIterator[str]:
    name = f"sp_empty_{uuid.uuid4().hex[:10]}"
    admin = await pg_server.connect()
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    yield name
    drop_later(pg_server, name)


async def test_migrations_apply_once_even_when_two_replicas_start_together(
        pg_server: PgServer, empty_db: str) -> None:
    conns = [await pg_server.connect(empty_db) for _ in range(2)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        expected = [m.version for m in load_migrations()]
        assert sorted(results, key=len) == [[], expected]
        assert await migrate(conns[0]) == []  # idempotent
        ledger = await conns[0].fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in ledger] == expected
    finally:
        for c in conns:
            await c.close()


EXPECTED_COLUMNS = {
    "machines": {"id", "machine_id", "first_seen", "last_seen"},
    "readings": {"id", "timestamp", "values", "machine_id", "failure_id", "inserted_at", "txid"},
    "failures": {"id", "start_time", "end_time", "is_active", "machine_id"},
    "predictions": {"id", "cluster_id", "model_version", "confidence_score", "prediction_time",
                    "mlflow_run_id", "model_name", "reading_id", "model_label"},
    "clusters": {"id", "mlflow_run_id", "mlflow_model_version", "created_at", "is_active",
                 "n_clusters", "silhouette_score", "cluster_profiles"},
    "versions": {"id", "version", "run_id", "created_at", "is_processed"},
    "drift": {"id", "detection_time", "drift_score", "reference_distribution",
              "current_distribution", "model_version", "peak_score", "ended_at"},
}


async def test_the_schema_keeps_the_old_systems_tables_and_columns(conn: asyncpg.Connection
                                                                   ) -> None:
    rows = await conn.fetch(
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = 'public'")
    columns: dict[str, set[str]] = {}
    for r in rows:
        columns.setdefault(r["table_name"], set()).add(r["column_name"])
    for table, expected in EXPECTED_COLUMNS.items():
        assert columns.get(table, set()) >= expected, table
    unique = await conn.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE conname = 'predictions_reading_model_key'")
    assert unique == "UNIQUE (reading_id, model_version)"


async def test_the_old_writers_plain_insert_still_works(conn: asyncpg.Connection) -> None:
    await conn.execute("INSERT INTO machines (machine_id) VALUES ('legacy')")
    await conn.execute(
        'INSERT INTO readings ("timestamp", "values", machine_id) VALUES (now(), $1, 1)',
        json.dumps(reading(1)))
    row = await conn.fetchrow("SELECT txid, inserted_at FROM readings")
    assert row["txid"] > 0 and row["inserted_at"] is not None


async def test_a_10000_row_insert_sends_one_small_notification(
        database: Database, conn: asyncpg.Connection) -> None:
    """While a worker sleeps (it holds the bell of migration 0013), a 10,000-row insert sends
    one empty notification; while none does (all awake, or none armed), writers do not notify
    (docs/how-it-works.md, the doorbell)."""
    listener = await database.connect()
    received: list[tuple[str, str]] = []
    await listener.add_listener("sensor_readings", lambda *a: received.append((a[2], a[3])))
    asleep = await database.connect()
    try:
        await insert_readings(conn, [reading(i) for i in range(100)])
        await asyncio.sleep(0.3)
        assert received == []  # nobody armed: no notification
        await asleep.execute("SELECT pg_advisory_lock(21329, 2)")
        await insert_readings(conn, [reading(i) for i in range(10_000)])
        await asyncio.sleep(0.5)
        assert received == [("sensor_readings", "")]
    finally:
        await asleep.close()
        await listener.close()


async def test_making_a_model_active_notifies_the_model_channel(
        database: Database, conn: asyncpg.Connection) -> None:
    listener = await database.connect()
    received: list[str] = []
    await listener.add_listener("sensor_model", lambda *a: received.append(a[2]))
    try:
        await conn.execute("INSERT INTO clusters (mlflow_run_id, is_active) VALUES ('a', true)")
        await asyncio.sleep(0.3)
        await conn.execute("UPDATE clusters SET is_active = false")
        await asyncio.sleep(0.3)
        assert received == ["sensor_model", "sensor_model"]
    finally:
        await listener.close()


async def test_a_batch_never_scans_the_whole_readings_table(
        database: Database, conn: asyncpg.Connection) -> None:
    """Claims walk the (txid, id) index, reads fetch ids: no sequential scan, even while a
    transaction that started before every reading stays open."""
    held = await database.connect()
    tx = held.transaction()
    await tx.start()
    await held.execute("SELECT pg_current_xact_id()")  # running, in every snapshot's xip list
    try:
        await insert_readings(conn, [reading(i) for i in range(20_000)])
        await conn.execute("ANALYZE readings")
        before = await _seq_scans(conn)
        for _ in range(20):
            claim = await conn.fetchrow("SELECT * FROM sp_claim('test', 100)")
            assert claim is not None and len(claim["reading_ids"]) == 100
        plan = await conn.fetchval(
            "EXPLAIN (FORMAT JSON) SELECT id FROM readings r WHERE r.id = ANY($1::bigint[])",
            claim["reading_ids"])
        assert "Seq Scan" not in json.dumps(plan)
        after = await _seq_scans(conn)
        assert after == before
    finally:
        await tx.rollback()
        await held.close()
    # The counter does move when something does scan the table (so the check above can fail).
    await conn.execute("SET enable_indexscan = off; SET enable_bitmapscan = off;"
                       " SELECT count(*) FROM readings WHERE machine_id > 0")
    assert await _seq_scans(conn) == after + 1


async def _seq_scans(conn: asyncpg.Connection) -> int:
    # Statistics reach the cumulative views asynchronously: flush, then read a fresh snapshot.
    await conn.execute("SELECT pg_stat_force_next_flush()")
    await asyncio.sleep(0.2)
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return int(await conn.fetchval(
        "SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'readings'"))
