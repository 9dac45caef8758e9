"""`migrate` on a database the old system made and filled: nothing lost, nothing rewritten, the
same schema as a fresh `migrate` except where the two must differ, and the old ORM still happy."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from sensor_predictor.devtools import old_system
from sensor_predictor.devtools.postgres import PgServer, create_database
from sensor_predictor.migrate import load_migrations, migrate
from tests.support import old_orm
from tests.support.databases import drop_later

pytestmark = pytest.mark.asyncio


async def _new_db(server: PgServer, prefix: str) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    await create_database(server, name)
    return name


@pytest_asyncio.fixture
async def old_db(pg_server: PgServer) -> AsyncIterator[str]:
    """A database the old system created and filled (5,000 readings, half of the ones without
    a failure scored by the old predictor)."""
    name = await _new_db(pg_server, "sp_old")
    conn = await pg_server.connect(name)
    try:
        await old_system.create_old_schema(conn)
        await old_system.bulk_history(conn, 5_000)
        consumer = old_system.Consumer(conn)
        for i in range(20):  # and a few messages the consumer's own way, one failure episode
            await consumer.write("machine-live", old_system.message(random.Random(i)),
                                 has_failure=5 <= i < 10)
        await old_system.old_predictions(conn, "1", "old-run-1")
    finally:
        await conn.close()
    yield name
    drop_later(pg_server, name)


@pytest_asyncio.fixture
async def fresh_db(pg_server: PgServer) -> AsyncIterator[str]:
    name = await _new_db(pg_server, "sp_fresh")
    conn = await pg_server.connect(name)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    yield name
    drop_later(pg_server, name)


# Where an adopted database must differ from a fresh one: (table, column) -> {attribute: (adopted,
# fresh)}. The old tables keep their integer ids (widening them would rewrite the tables) and the
# NOT NULLs the old ORM made (adding one would scan a table, dropping one would loosen it).
EXPECTED_COLUMN_DIFFERENCES: dict[tuple[str, str], dict[str, tuple[Any, Any]]] = {
    **{(t, "id"): {"type": ("integer", "bigint")}
       for t in ("machines", "failures", "readings", "predictions", "clusters", "versions",
                 "drift")},
    ("failures", "machine_id"): {"type": ("integer", "bigint")},
    ("readings", "machine_id"): {"type": ("integer", "bigint")},
    ("readings", "failure_id"): {"type": ("integer", "bigint")},
    ("predictions", "reading_id"): {"type": ("integer", "bigint")},
    ("readings", "values"): {"not_null": (True, False)},
    ("predictions", "model_name"): {"not_null": (False, True)},
}
# Constraints whose names the old ORM generated (kept: its code and its users know them), and
# its foreign keys' ON DELETE rules.
EXPECTED_CONSTRAINT_DIFFERENCES = {
    "adopted only": {"uid_predictions_reading_171b97 UNIQUE (reading_id, model_version)",
                     "failures_machine_id_fkey FOREIGN KEY (machine_id) REFERENCES machines(id)"
                     " ON DELETE CASCADE",
                     "predictions_reading_id_fkey FOREIGN KEY (reading_id) REFERENCES"
                     " readings(id) ON DELETE CASCADE",
                     "readings_failure_id_fkey FOREIGN KEY (failure_id) REFERENCES"
                     " failures(id) ON DELETE SET NULL",
                     "readings_machine_id_fkey FOREIGN KEY (machine_id) REFERENCES machines(id)"
                     " ON DELETE CASCADE"},
    "fresh only": {"predictions_reading_model_key UNIQUE (reading_id, model_version)",
                   "failures_machine_id_fkey FOREIGN KEY (machine_id) REFERENCES machines(id)",
                   "predictions_reading_id_fkey FOREIGN KEY (reading_id) REFERENCES"
                   " readings(id)",
                   "readings_failure_id_fkey FOREIGN KEY (failure_id) REFERENCES failures(id)",
                   "readings_machine_id_fkey FOREIGN KEY (machine_id) REFERENCES machines(id)"},
}


async def _columns(conn: asyncpg.Connection) -> dict[tuple[str, str], dict[str, Any]]:
    rows = await conn.fetch("""
        SELECT c.relname AS table, a.attname AS column,
               format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull AS not_null,
               pg_get_expr(d.adbin, d.adrelid) AS default
          FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r'
           AND a.attnum > 0 AND NOT a.attisdropped""")
    return {(r["table"], r["column"]): {"type": r["type"], "not_null": r["not_null"],
                                        "default": r["default"]} for r in rows}


async def _constraints(conn: asyncpg.Connection) -> set[str]:
    return {f"{r['conname']} {r['def']}" for r in await conn.fetch(
        "SELECT conname, pg_get_constraintdef(oid) AS def FROM pg_constraint"
        " WHERE connamespace = 'public'::regnamespace")}


async def _indexes(conn: asyncpg.Connection) -> set[str]:
    return {r["indexdef"] for r in await conn.fetch(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = 'public'"
        "   AND indexname NOT IN (SELECT conname FROM pg_constraint)")}


async def _functions_and_triggers(conn: asyncpg.Connection) -> set[str]:
    functions = {r[0] for r in await conn.fetch(
        "SELECT pg_get_functiondef(p.oid) FROM pg_proc p"
        " WHERE p.pronamespace = 'public'::regnamespace")}
    triggers = {r[0] for r in await conn.fetch(
        "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal")}
    return functions | triggers


async def _snapshot(conn: asyncpg.Connection, table: str) -> list[asyncpg.Record]:
    return list(await conn.fetch(f"SELECT * FROM {table} ORDER BY id"))


async def test_adopting_keeps_every_row_and_matches_a_fresh_schema(
        pg_server: PgServer, old_db: str, fresh_db: str) -> None:
    old = await pg_server.connect(old_db)
    fresh = await pg_server.connect(fresh_db)
    try:
        before = {t: await _snapshot(old, t) for t in
                  ("machines", "failures", "readings", "predictions")}
        relfiles = {r["relname"]: r["relfilenode"] for r in await old.fetch(
            "SELECT relname, relfilenode FROM pg_class WHERE relname IN"
            " ('readings', 'predictions', 'machines', 'failures')")}
        assert await migrate(old) == [m.version for m in load_migrations()]

        # Nothing lost, nothing changed, nothing rewritten (same file on disk).
        for table, rows in before.items():
            after = await old.fetch(f"SELECT * FROM {table} ORDER BY id")
            assert len(after) == len(rows), table
            for a, b in zip(after, rows, strict=True):
                assert {k: a[k] for k in b.keys()} == dict(b), table  # noqa: SIM118 (a Record iterates values)
        assert {r["relname"]: r["relfilenode"] for r in await old.fetch(
            "SELECT relname, relfilenode FROM pg_class WHERE relname IN"
            " ('readings', 'predictions', 'machines', 'failures')")} == relfiles
        # Rows from before read as committed before everything, and were written "now".
        assert await old.fetchval("SELECT count(*) FROM readings WHERE txid <> '0'") == 0
        assert await old.fetchval("SELECT count(*) FROM readings WHERE inserted_at IS NULL") == 0

        # Column by column: the same, except where listed (and said why above).
        adopted_cols, fresh_cols = await _columns(old), await _columns(fresh)
        assert adopted_cols.keys() == fresh_cols.keys()
        differences = {}
        for key, fresh_attrs in fresh_cols.items():
            diff = {attr: (adopted_cols[key][attr], value)
                    for attr, value in fresh_attrs.items() if adopted_cols[key][attr] != value}
            if diff:
                differences[key] = diff
        assert differences == EXPECTED_COLUMN_DIFFERENCES
        adopted_cons, fresh_cons = await _constraints(old), await _constraints(fresh)
        assert {"adopted only": adopted_cons - fresh_cons,
                "fresh only": fresh_cons - adopted_cons} == EXPECTED_CONSTRAINT_DIFFERENCES
        assert await _indexes(old) == await _indexes(fresh)
        assert await _functions_and_triggers(old) == await _functions_and_triggers(fresh)
        # The old ORM's sequences stay integer: ids keep counting where they were.
        assert await old.fetchval(
            "SELECT data_type FROM information_schema.sequences"
            " WHERE sequence_name = 'readings_id_seq'") == "integer"
    finally:
        await old.close()
        await fresh.close()


async def test_plain_sql_clients_work_on_the_adopted_database(
        pg_server: PgServer, old_db: str) -> None:
    """The defaults the old ORM only ever set in Python now exist in the database."""
    conn = await pg_server.connect(old_db)
    try:
        await migrate(conn)
        m = await conn.fetchval("INSERT INTO machines (machine_id) VALUES ('sql') RETURNING id")
        f = await conn.fetchval("INSERT INTO failures (machine_id) VALUES ($1) RETURNING id", m)
        r = await conn.fetchval(
            'INSERT INTO readings ("timestamp", "values", machine_id) VALUES (now(), $1, $2)'
            " RETURNING id", json.dumps(old_system.message(random.Random(1))), m)
        assert await conn.fetchval("SELECT txid > '0' FROM readings WHERE id = $1", r)
        await conn.execute("INSERT INTO predictions (cluster_id, model_version, reading_id)"
                           " VALUES (0, 'x', $1)", r)
        assert await conn.fetchval("SELECT model_name FROM predictions WHERE model_version = 'x'"
                                   ) == "sensor_failure_clustering"
        await conn.execute("INSERT INTO clusters (mlflow_run_id, is_active) VALUES ('r', true)")
        await conn.execute("INSERT INTO versions (version, run_id) VALUES ('1', 'r')")
        await conn.execute("INSERT INTO drift (drift_score, reference_distribution,"
                           " current_distribution) VALUES (0.5, '{}', '{}')")
        assert await conn.fetchval("SELECT is_active FROM failures WHERE id = $1", f)
    finally:
        await conn.close()


async def test_the_old_consumer_starts_and_writes_through_its_orm_afterwards(
        pg_server: PgServer, old_db: str) -> None:
    conn = await pg_server.connect(old_db)
    try:
        await migrate(conn)
        dsn = f"postgres://{pg_server.user}@{pg_server.host}:{pg_server.port}/{old_db}"
        await old_orm.generate_schemas(dsn)  # its start: CREATE TABLE IF NOT EXISTS ...
        reading_id = await old_orm.orm_write_reading(
            dsn, "orm-machine", old_system.message(random.Random(2)))
        assert await conn.fetchval("SELECT txid > '0' FROM readings WHERE id = $1", reading_id)
        assert await migrate(conn) == []  # and migrate stays idempotent after it
    finally:
        await conn.close()


async def test_two_replicas_adopting_at_once_apply_each_migration_once(
        pg_server: PgServer, old_db: str) -> None:
    conns = [await pg_server.connect(old_db) for _ in range(2)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        assert sorted(results, key=len) == [[], [m.version for m in load_migrations()]]
    finally:
        for c in conns:
            await c.close()


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_the_old_consumer_keeps_writing_while_we_adopt_its_database(
        pg_server: PgServer) -> None:
    """Online: 200,000 old readings; the consumer writes one message per transaction all along.
    Its longest wait is under a second, and no message fails."""
    name = await _new_db(pg_server, "sp_online")
    conn = await pg_server.connect(name)
    writer_conn = await pg_server.connect(name)
    try:
        await old_system.create_old_schema(conn)
        await old_system.bulk_history(conn, 200_000)
        consumer = old_system.Consumer(writer_conn)
        stop = asyncio.Event()
        waits: list[float] = []

        async def write() -> None:

            rnd = random.Random(3)
            while not stop.is_set():
                t0 = time.perf_counter()
                await consumer.write("machine-1", old_system.message(rnd), has_failure=False)
                waits.append(time.perf_counter() - t0)
                await asyncio.sleep(0.002)

        task = asyncio.create_task(write())
        await asyncio.sleep(0.5)
        t0 = time.perf_counter()
        await migrate(conn)
        took = time.perf_counter() - t0
        await asyncio.sleep(0.5)
        stop.set()
        await task
        assert max(waits) < 1.0, (max(waits), took)
        assert len(waits) > 100
        assert await conn.fetchval("SELECT count(*) FROM readings WHERE txid <> '0'") > 0
    finally:
        await writer_conn.close()
        await conn.close()
        drop_later(pg_server, name)
