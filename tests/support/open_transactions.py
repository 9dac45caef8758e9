"""Transactions left open while readings stream (tests/chaos/test_open_transactions.py): the
stream's latency meanwhile, and the two long holds the chaos tier runs beside its other tests
(a write transaction open 60 s in another database, a prepared transaction left 30 s), each
in a thread of its own (tests.support.background) with its own database and worker."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from sensor_predictor.devtools.postgres import PgServer, create_database, drop_database
from sensor_predictor.training import activate_model
from tests.support.chaos import StreamWriter, check_invariant, percentile, served, wait_settled
from tests.support.chaos_fixtures import Workers
from tests.support.databases import Database
from tests.support.models import Models
from tests.support.waiting import wait_for

# "Normal latency" for the stream while something is held open, on a busy 2-core machine: the
# stall this guards against was total (nothing scored until the transaction ended).
MAX_P50_SECONDS = 0.25
MAX_SECONDS = 2.0


async def latencies(conn: asyncpg.Connection, above: int, up_to: int) -> list[float]:
    """Insert -> prediction commit, per reading with id in (above, up_to]."""
    rows = await conn.fetch(
        "SELECT extract(epoch FROM p.prediction_time - r.inserted_at)::float8 AS s"
        "  FROM readings r JOIN predictions p ON p.reading_id = r.id"
        " WHERE r.id > $1 AND r.id <= $2", above, up_to)
    return [r["s"] for r in rows]


async def _unscored_between(conn: asyncpg.Connection, above: int, up_to: int) -> int:
    return int(await conn.fetchval(
        "SELECT count(*) FROM readings r WHERE r.id > $1 AND r.id <= $2"
        " AND NOT EXISTS (SELECT 1 FROM predictions p WHERE p.reading_id = r.id)",
        above, up_to))


async def stream_while(db: Database, conn: asyncpg.Connection, hold_seconds: float
                       ) -> tuple[StreamWriter, int, int]:
    """Stream for hold_seconds; returns the writer and the id range written meanwhile."""
    writer = StreamWriter(db.server, db.name, rows=10, pause=0.02).start()
    await asyncio.sleep(0.5)
    first = writer.stats.max_id
    await asyncio.sleep(hold_seconds)
    last = writer.stats.max_id
    # Everything written while the transaction was open is scored before it ends.
    assert await wait_for(lambda: _none_unscored(conn, first, last), timeout=MAX_SECONDS)
    return writer, first, last


async def _none_unscored(conn: asyncpg.Connection, first: int, last: int) -> bool:
    return await _unscored_between(conn, first, last) == 0


def check_normal(latencies: list[float]) -> tuple[float, float, float]:
    assert latencies, "nothing was written while the transaction was open"
    p50, p99, worst = (statistics.median(latencies), percentile(latencies, 0.99),
                       max(latencies))
    assert p50 <= MAX_P50_SECONDS and worst <= MAX_SECONDS, (p50, p99, worst)
    return p50, p99, worst


@contextlib.asynccontextmanager
async def other_database(server: PgServer) -> AsyncIterator[str]:
    name = f"sp_neighbour_{uuid.uuid4().hex[:8]}"
    await create_database(server, name)
    try:
        yield name
    finally:
        await drop_database(server, name)


async def write_transaction_open_60_s_elsewhere(db: Database, models: Models, workers: Workers
                                                ) -> dict[str, Any]:
    """Scenario 11, to its end; the row of the chaos report."""
    conn = await db.connect()
    try:
        await activate_model(conn, *models.v1)
        worker = workers.start()
        await asyncio.to_thread(worker.wait_ready)
        async with other_database(db.server) as other:
            neighbour = await db.server.connect(other)
            try:
                await neighbour.execute("CREATE TABLE batch_job (n int)")
                await neighbour.execute("BEGIN")
                await neighbour.execute("INSERT INTO batch_job VALUES (1)")  # it has an xid
                writer, first, last = await stream_while(db, conn, hold_seconds=60)
                found = await latencies(conn, first, last)
                await neighbour.execute("COMMIT")
            finally:
                await neighbour.close()
        stats = await writer.stop()
        assert await wait_settled(conn, 30), worker.logs()[-3000:]
        outcome = await check_invariant(conn, served(models.v1),
                                        expected_readings=stats.committed)
        p50, p99, worst = check_normal(found)
    finally:
        await conn.close()
    return dict(scenario="11. write transaction open 60 s in another database",
                runs=1, readings=outcome.tally.readings, lost=outcome.lost,
                duplicated=outcome.duplicated,
                recovery=(f"stream scored meanwhile: insert->prediction p50 {p50 * 1000:.0f} "
                          f"ms, p99 {p99 * 1000:.0f} ms, max {worst * 1000:.0f} ms"),
                detail=f"{len(found)} readings written while it was open")


async def prepared_transaction_left_30_s(db: Database, models: Models, workers: Workers
                                         ) -> dict[str, Any]:
    """Scenario 13, to its end; the row of the chaos report. Two-phase commit: prepared, then
    neither committed nor rolled back for 30 s. (It writes a machine: a transaction that
    inserts readings cannot be prepared, because the readings trigger notifies, and
    PostgreSQL refuses PREPARE after NOTIFY.) Needs max_prepared_transactions > 0."""
    conn = await db.connect()
    try:
        await activate_model(conn, *models.v1)
        worker = workers.start()
        await asyncio.to_thread(worker.wait_ready)
        gid = f"sp-{uuid.uuid4().hex[:8]}"
        coordinator = await db.connect()
        try:
            await coordinator.execute("BEGIN")
            await coordinator.execute("INSERT INTO machines (machine_id) VALUES ('two-phase')")
            await coordinator.execute(f"PREPARE TRANSACTION '{gid}'")
            writer, first, last = await stream_while(db, conn, hold_seconds=30)
            found = await latencies(conn, first, last)
        finally:
            with contextlib.suppress(asyncpg.PostgresError):
                await coordinator.execute(f"COMMIT PREPARED '{gid}'")
            await coordinator.close()
        stats = await writer.stop()
        assert await wait_settled(conn, 30), worker.logs()[-3000:]
        outcome = await check_invariant(conn, served(models.v1),
                                        expected_readings=stats.committed)
        p50, p99, worst = check_normal(found)
    finally:
        await conn.close()
    return dict(scenario="13. prepared transaction left 30 s", runs=1,
                readings=outcome.tally.readings, lost=outcome.lost,
                duplicated=outcome.duplicated,
                recovery=(f"stream meanwhile p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
                          f"max {worst * 1000:.0f} ms"),
                detail=f"{len(found)} readings written while it was prepared")
