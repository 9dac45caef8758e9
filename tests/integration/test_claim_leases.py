"""Lease ownership (POSTGRES_POOL_MODE=transaction) with real worker processes against the
server directly: a worker frozen past its lease loses its claim to the other, its late results
are discarded and counted, every reading is scored exactly once, and no advisory lock is ever
taken. (The PgBouncer tier runs the same workers behind a transaction pooler.)"""

from __future__ import annotations

import asyncio
import signal
import time

import asyncpg
import pytest

from sensor_predictor.devtools.tally import tally
from sensor_predictor.training import activate_model
from tests.support.databases import Database
from tests.support.fixtures import WorkerFactory
from tests.support.models import Models
from tests.support.readings import insert_readings, reading
from tests.support.waiting import wait_for

pytestmark = pytest.mark.asyncio

LEASE = 2.0
ADVISORY_LOCKS = ("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database ="
                  " (SELECT oid FROM pg_database WHERE datname = current_database())"
                  # (21328, -1): a claim in flight, for its transaction only (sp_orphans' mark)
                  " AND NOT (classid = 21328 AND objid = 4294967295 AND objsubid = 2)"
                  # (21329, 2) and (21329, 3): the doorbell's, on its own direct session
                  " AND NOT (classid = 21329 AND objid IN (2, 3) AND objsubid = 2)")


async def _stream(database: Database, stop: asyncio.Event, locks_seen: list[int]) -> int:
    c = await database.connect()
    written = 0
    try:
        while not stop.is_set():
            await insert_readings(c, [reading(written + i) for i in range(20)])
            written += 20
            locks_seen.append(int(await c.fetchval(ADVISORY_LOCKS)))
            await asyncio.sleep(0.02)
    finally:
        await c.close()
    return written


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_worker_frozen_past_its_lease_loses_its_claim_and_its_late_results(
        database: Database, conn: asyncpg.Connection, models: Models,
        worker_factory: WorkerFactory) -> None:
    await activate_model(conn, *models.v1)
    env = {"POSTGRES_POOL_MODE": "transaction", "CLAIM_LEASE_SECONDS": str(LEASE),
           "PREDICTION_BATCH_SIZE": "20"}
    frozen, other = worker_factory(**env).start(), worker_factory(**env).start()
    await frozen.until_ready()
    await other.until_ready()
    stop = asyncio.Event()
    locks_seen: list[int] = []
    writer = asyncio.create_task(_stream(database, stop, locks_seen))
    mine = f"%:{frozen.pid}:%"
    owned = "SELECT id FROM scoring_claims WHERE worker LIKE $1"
    # Freeze it while it holds a claim (a batch in flight: its claim row is there).
    claim_id = None
    for _ in range(400):
        frozen.signal(signal.SIGSTOP)
        await asyncio.sleep(0.05)  # a statement already sent completes meanwhile
        claim_id = await conn.fetchval(owned, mine)
        if claim_id is not None:
            break
        frozen.signal(signal.SIGCONT)
        await asyncio.sleep(0.01)
    assert claim_id is not None, "never caught the worker with a claim in flight"
    stopped_at = time.monotonic()
    try:
        async def taken_over() -> bool:
            worker = await conn.fetchval("SELECT worker FROM scoring_claims WHERE id = $1",
                                         claim_id)
            return worker is None or f":{frozen.pid}:" not in worker

        assert await wait_for(taken_over, timeout=LEASE + 10, interval=0.02)
        takeover_s = time.monotonic() - stopped_at
        # Not before its lease ran out (renewed every LEASE/3, so at least 2/3 of it was left),
        # and within the lease plus a few orphan-timer ticks.
        assert LEASE * 2 / 3 - 0.1 <= takeover_s <= LEASE + 1.5, takeover_s
        await asyncio.sleep(0.5)  # the other worker writes the claim
    finally:
        frozen.signal(signal.SIGCONT)
    await asyncio.sleep(1.0)
    stop.set()
    written = await writer

    async def all_scored() -> bool:
        t = await tally(conn)
        return t.missing == 0 and t.readings == written

    assert await wait_for(all_scored, timeout=60)
    t = await tally(conn)
    assert t.exactly_once, t
    late = frozen.metric("sensor_claim_late_results_total")
    assert late is not None and late >= 1, frozen.tail()
    assert (other.metric("sensor_claims_taken_over_total") or 0) >= 1
    assert '"claim_results_discarded"' in frozen.logs() or "claim_results_discarded" in \
        frozen.logs()
    # Leases only: no advisory lock was ever held in this database, none is left.
    assert max(locks_seen) == 0
    assert await conn.fetchval(ADVISORY_LOCKS) == 0
    assert await conn.fetchval("SELECT count(*) FROM scoring_claims") == 0
    print(f"takeover after SIGSTOP: {takeover_s:.2f} s (lease {LEASE} s); late results "
          f"discarded: {late:.0f}; readings: {written}")


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_an_orphan_is_taken_over_within_a_second_in_a_quiet_stream(
        database: Database, conn: asyncpg.Connection, models: Models,
        worker_factory: WorkerFactory) -> None:
    """A session that claimed readings and ended (its lock gone): the worker's orphan timer
    takes the claim over and writes it, with no new reading and no wake-up to prompt it."""
    await activate_model(conn, *models.v1)
    worker = worker_factory().start()
    await worker.until_ready()
    ids = await insert_readings(conn, [reading(i) for i in range(5)])
    assert await wait_for(lambda: _scored(conn, ids), timeout=10)
    # Someone else's claim, session-owned, left behind by a session that ends. It holds the
    # cursor while the readings are written, so the worker (woken by them) claims after it.
    ghost = await database.connect()
    tx = ghost.transaction()
    await tx.start()
    await ghost.execute("SELECT 1 FROM scoring_cursor FOR UPDATE")
    late = await insert_readings(conn, [reading(i) for i in range(3)])
    orphaned = await ghost.fetchrow("SELECT claim_id, reading_ids FROM sp_claim('ghost', 10)")
    await tx.commit()
    assert sorted(orphaned["reading_ids"]) == late
    await asyncio.sleep(1.0)  # nothing happens while its owner lives
    assert not await _scored(conn, late)
    await ghost.close()
    ended = time.monotonic()
    assert await wait_for(lambda: _scored(conn, late), timeout=5, interval=0.01)
    took = time.monotonic() - ended
    assert took < 1.0, took
    assert (worker.metric("sensor_claims_taken_over_total") or 0) == 1
    print(f"orphan taken over and written {took:.3f} s after its session ended")


async def _scored(conn: asyncpg.Connection, ids: list[int]) -> bool:
    return int(await conn.fetchval(
        "SELECT count(*) FROM predictions WHERE reading_id = ANY($1::bigint[])", ids)) == len(ids)
