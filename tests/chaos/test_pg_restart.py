"""PostgreSQL restarted (pg_ctl stop -m fast / start) under a running worker and a stream."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest

from sensor_predictor.devtools.postgres import pg_ctl
from sensor_predictor.training import activate_model
from tests.support.chaos import (
    GOOD_ROWS,
    INSERT,
    OUTAGE,
    StreamWriter,
    check_invariant,
    machine_id,
    served,
    unscored,
    wait_settled,
)
from tests.support.chaos_fixtures import Workers
from tests.support.databases import Database
from tests.support.models import Models

pytestmark = [pytest.mark.asyncio, pytest.mark.chaos]

# The worker must be back within this long of the server's return, without a restart.
CATCH_UP_SECONDS = 2.0
# (seconds between pg_ctl stop returning and pg_ctl start, a writer transaction held open
# across the stop): a quick restart in a plain stream; and a slower one (a crash recovery, a
# failover) hitting the worker in the middle of a drain pass (it waits for readings behind the
# open transaction), so that its retries run, and back off, through the whole outage.
OUTAGES = ((1.0, False), (7.5, True))


async def _connect(db: Database, timeout: float = 30) -> asyncpg.Connection:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await db.connect()
        except (*OUTAGE, asyncpg.PostgresError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def _first_result_at_or_after(conn: asyncpg.Connection, reading_id: int) -> bool:
    return bool(await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM predictions WHERE reading_id >= $1)"
        " OR EXISTS (SELECT 1 FROM reading_errors WHERE reading_id >= $1)", reading_id))


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_postgres_restart_mid_stream_worker_catches_up_without_restart(
        chaos_db: Database, chaos_models: Models, workers: Workers, report: Any) -> None:
    server = chaos_db.server
    conn = await chaos_db.connect()
    await activate_model(conn, *chaos_models.v1)
    await conn.close()
    # The fallback poll is 5 minutes away: only reconnecting and listening again can explain a
    # quick catch-up.
    worker = workers.start(INFERENCE_INTERVAL_SECONDS="300")
    await asyncio.to_thread(worker.wait_ready)
    pid = worker.proc.pid if worker.proc else None
    writer = StreamWriter(server, chaos_db.name, rows=20, pause=0.02, tolerate_outage=True).start()
    restarts = len(OUTAGES)
    first_prediction: list[float] = []
    backlog_after: list[float] = []
    caught_up: list[float] = []
    outages: list[float] = []
    for pause, hold in OUTAGES:
        await asyncio.sleep(1.5)
        holder = await chaos_db.connect() if hold else None
        if holder is not None:
            await holder.execute("BEGIN")
            await holder.execute(INSERT, [GOOD_ROWS[0]], await machine_id(holder))
            await asyncio.sleep(0.5)  # the stream's next statements queue up behind it
        down = time.monotonic()
        await asyncio.to_thread(pg_ctl, server, "stop")
        if holder is not None:
            holder.terminate()  # its transaction died with the server: never committed
        await asyncio.sleep(pause)
        await asyncio.to_thread(pg_ctl, server, "start")
        up = time.monotonic()
        outages.append(up - down)
        conn = await _connect(chaos_db)
        try:
            # The writer's first statement committed after the return: when is it scored?
            first_new = None
            while first_new is None and time.monotonic() - up < 30:
                first_new = writer.stats.first_commit_after(up)
                await asyncio.sleep(0.005)
            assert first_new is not None, writer.stats
            while not await _first_result_at_or_after(conn, first_new[1]):
                assert time.monotonic() - up < 60, worker.logs()[-3000:]
                await asyncio.sleep(0.01)
            first_prediction.append(time.monotonic() - up)
            # Everything written from the return up to half a second later: when does its
            # backlog reach 0? And when is the outage's own backlog gone (readings written
            # before it, and a range claimed just before it, which waits for the orphan hunt)?
            await asyncio.sleep(max(0.0, up + 0.5 - time.monotonic()))
            mark = writer.stats.max_id
            after_done: float | None = None
            while after_done is None or await unscored(conn, up_to=mark) > 0:
                if after_done is None and await unscored(
                        conn, up_to=mark, above=first_new[1] - 1) == 0:
                    after_done = time.monotonic() - up
                assert time.monotonic() - up < 60, worker.logs()[-3000:]
                await asyncio.sleep(0.01)
            backlog_after.append(after_done)
            caught_up.append(time.monotonic() - up)
        finally:
            await conn.close()
    await asyncio.sleep(1.0)
    stats = await writer.stop()
    conn = await _connect(chaos_db)
    try:
        assert await wait_settled(conn, 30), worker.logs()[-3000:]
        outcome = await check_invariant(conn, served(chaos_models.v1))
    finally:
        await conn.close()
    # The writer counts what it knows it committed; a statement cut by the shutdown may or may
    # not have committed, and nothing else may appear or vanish.
    t = outcome.tally
    assert stats.committed <= t.readings <= stats.committed + stats.ambiguous, (stats, t)
    assert worker.proc is not None and worker.proc.poll() is None and worker.proc.pid == pid
    reconnects = worker.metric("sensor_db_reconnects_total", 'connection="listener"') or 0
    assert reconnects >= restarts, reconnects
    listening = [e for e in worker.events() if e.get("event") == "listening"]
    assert sum(1 for e in listening if e.get("reconnected")) >= restarts
    report(scenario="2. PostgreSQL restart mid-stream", runs=restarts, readings=t.readings,
           lost=outcome.lost, duplicated=outcome.duplicated,
           recovery=("after pg_ctl start returned: first new prediction "
                     + "/".join(f"{x:.2f}" for x in first_prediction) + " s, backlog of "
                     "readings written after it 0 in "
                     + "/".join(f"{x:.2f}" for x in backlog_after) + " s"),
           detail=("outages (stop + " + "/".join(f"{x:g}" for x, _ in OUTAGES) + " s + start) "
                   + "/".join(f"{x:.1f}" for x in outages) + " s; writer committed "
                   f"{stats.committed}, {stats.ambiguous} rows in statements cut by the "
                   f"shutdown, {stats.connect_failures} failed connects; worker pid unchanged, "
                   f"listener reconnects {reconnects:g}; the whole outage backlog (with "
                   "the range claimed as the server went down, re-taken as an orphan) 0 in "
                   + "/".join(f"{x:.2f}" for x in caught_up) + " s"))
    assert max(first_prediction) <= CATCH_UP_SECONDS, first_prediction
    assert max(backlog_after) <= CATCH_UP_SECONDS, backlog_after


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_an_immediate_shutdown_mid_stream_loses_and_doubles_nothing(
        chaos_db: Database, chaos_models: Models, workers: Workers, report: Any) -> None:
    """A claim commits without waiting for the disk; its results' commit does wait, and comes
    later in the WAL. An immediate shutdown (every server process quits at once, WAL buffers not
    written yet are gone) must then lose a claim only together with its results."""
    server = chaos_db.server
    conn = await chaos_db.connect()
    await activate_model(conn, *chaos_models.v1)
    await conn.close()
    # Small batches: many claims a second, so that each crash lands among claims in flight.
    worker = workers.start(PREDICTION_BATCH_SIZE="20", INFERENCE_INTERVAL_SECONDS="300")
    await asyncio.to_thread(worker.wait_ready)
    writer = StreamWriter(server, chaos_db.name, rows=50, pause=0.005,
                          tolerate_outage=True).start()
    crashes = 3
    recovered: list[float] = []
    for _ in range(crashes):
        await asyncio.sleep(1.5)
        await asyncio.to_thread(pg_ctl, server, "stop", "-m", "immediate")
        await asyncio.to_thread(pg_ctl, server, "start")
        up = time.monotonic()
        conn = await _connect(chaos_db)
        try:
            mark = writer.stats.max_id
            while await unscored(conn, up_to=mark) > 0:
                assert time.monotonic() - up < 60, worker.logs()[-3000:]
                await asyncio.sleep(0.02)
            recovered.append(time.monotonic() - up)
        finally:
            await conn.close()
    stats = await writer.stop()
    conn = await _connect(chaos_db)
    try:
        assert await wait_settled(conn, 30), worker.logs()[-3000:]
        outcome = await check_invariant(conn, served(chaos_models.v1))
    finally:
        await conn.close()
    t = outcome.tally
    assert stats.committed <= t.readings <= stats.committed + stats.ambiguous, (stats, t)
    report(scenario="2b. PostgreSQL immediate shutdown mid-stream", runs=crashes,
           readings=t.readings, lost=outcome.lost, duplicated=outcome.duplicated,
           recovery="backlog 0 " + "/".join(f"{x:.2f}" for x in recovered)
                    + " s after the server was back",
           detail=f"writer committed {stats.committed}, {stats.ambiguous} rows ambiguous")
