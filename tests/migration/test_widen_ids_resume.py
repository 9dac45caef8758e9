"""widen-ids is resumable: a swap that cannot get its locks (a long transaction holds one)
gives up after its tries, leaves everything done so far in place, blocks no writer meanwhile for
longer than its lock timeout, and the next run finishes with the data unchanged."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio

from sensor_predictor import db
from sensor_predictor.devtools import old_system
from sensor_predictor.devtools.postgres import PgServer, create_database
from sensor_predictor.migrate import migrate
from sensor_predictor.widen_ids import headroom, widen_ids
from tests.support.databases import drop_later

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def adopted(pg_server: PgServer) -> AsyncIterator[str]:
    name = f"sp_resume_{uuid.uuid4().hex[:10]}"
    await create_database(pg_server, name)
    conn = await pg_server.connect(name)
    try:
        await old_system.create_old_schema(conn)
        await old_system.bulk_history(conn, 3_000)
        await old_system.old_predictions(conn, "1", "old-run-1")
        await migrate(conn)
    finally:
        await conn.close()
    yield name
    drop_later(pg_server, name)


async def _rows(conn: asyncpg.Connection) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
    return (await conn.fetch('SELECT id, "values", machine_id, failure_id FROM readings'
                             " ORDER BY id"),
            await conn.fetch("SELECT id, reading_id, cluster_id, model_version FROM predictions"
                             " ORDER BY id"))


async def _types(conn: asyncpg.Connection) -> set[str]:
    return {r[0] for r in await conn.fetch(
        "SELECT format_type(a.atttypid, NULL) FROM pg_attribute a"
        " WHERE a.attrelid IN ('readings'::regclass, 'predictions'::regclass)"
        "   AND a.attname IN ('id', 'reading_id')")}


async def test_the_headroom_query_works_for_the_worker_role(pg_server: PgServer,
                                                            adopted: str) -> None:
    """sensor_id_headroom_ratio's query as the worker runs it (it may read readings and use
    predictions_id_seq, nothing more): integer limits on the adopted database."""
    conn = await pg_server.connect(adopted)
    try:
        await conn.execute("SET ROLE sensor_predictor_worker")
        rows = {r["tbl"]: r for r in await conn.fetch(db.queries()["id_headroom"])}
    finally:
        await conn.close()
    assert rows["readings"]["id_max"] == rows["predictions"]["id_max"] == 2**31 - 1
    assert rows["readings"]["id_used"] >= 3_000
    assert rows["predictions"]["id_used"] > 0
    assert 0.99 < headroom(rows["readings"]["id_max"], rows["readings"]["id_used"]) < 1.0


async def test_an_interrupted_widening_resumes(pg_server: PgServer, adopted: str) -> None:
    conn = await pg_server.connect(adopted)
    holder = await pg_server.connect(adopted)
    writer = await pg_server.connect(adopted)
    try:
        before = await _rows(conn)
        # A long reader of reading_errors (whose foreign key the swap moves): the swap's ACCESS
        # EXCLUSIVE lock never comes (the prepare step does not need that table).
        await holder.execute("BEGIN; SELECT count(*) FROM reading_errors")
        stalls: list[float] = []
        replans: list[int] = []
        stop = asyncio.Event()

        async def write() -> None:
            consumer = old_system.Consumer(writer)
            i = 0
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    await consumer.write("machine-resume", old_system.message(random.Random(i)),
                                         has_failure=False)
                except asyncpg.InvalidCachedStatementError:  # once, after the swap
                    replans.append(i)
                stalls.append(time.monotonic() - t0)
                i += 1
                await asyncio.sleep(0.005)

        task = asyncio.create_task(write())
        with pytest.raises(asyncpg.LockNotAvailableError):
            await widen_ids(conn, batch_size=500, lock_timeout_ms=100, lock_attempts=3)
        # Interrupted before the swap: the copies, their trigger and their indexes are there.
        assert await _types(conn) == {"integer"}
        assert await conn.fetchval(
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'sp_widen_copy'") == 2
        assert await conn.fetchval(
            "SELECT count(*) FROM pg_class WHERE relname LIKE '%\\_bigint' AND relkind = 'i'") == 4
        await holder.execute("COMMIT")
        report = await widen_ids(conn, batch_size=500, lock_timeout_ms=100)
        stop.set()
        await task
        assert report.backfilled_rows == 0  # all copied by the first run or the trigger
        assert await _types(conn) == {"bigint"}
        after = await _rows(conn)
        written = len(stalls) - len(replans)
        assert len(replans) <= 1
        assert [tuple(r) for r in after[0][:len(before[0])]] == [tuple(r) for r in before[0]]
        assert len(after[0]) >= len(before[0]) + written - 1
        assert [tuple(r) for r in after[1]] == [tuple(r) for r in before[1]]
        assert max(stalls) < 1.0, max(stalls)
        assert (await widen_ids(conn)).widened == []
    finally:
        for c in (conn, holder, writer):
            await c.close()
