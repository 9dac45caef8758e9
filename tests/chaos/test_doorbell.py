"""The doorbell (migrations/0013_doorbell.sql, src/sensor_predictor/doorbell.py): writers notify
only while a worker may be asleep, and no reading waits for the poll because of it."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from sensor_predictor.devtools.worker_process import WorkerProcess
from sensor_predictor.doorbell import BELL_CLASS, BELL_KEY, STANDBY_KEY
from sensor_predictor.training import activate_model
from tests.support.chaos import check_invariant, served, unscored, wait_settled
from tests.support.chaos_fixtures import Workers
from tests.support.databases import Database
from tests.support.models import Models
from tests.support.readings import insert_readings, machine_id, reading
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.asyncio, pytest.mark.chaos]

# The poll is 5 minutes away: only a notification (or the doorbell's own look) explains a
# prompt score.
NO_POLL = {"INFERENCE_INTERVAL_SECONDS": "300", "HEARTBEAT_SECONDS": "3"}
PROMPT_SECONDS = 1.0
INSERT_ONE = ('INSERT INTO readings ("values", machine_id) VALUES ($1::jsonb, $2)'
              " RETURNING id")
LOCKS = """SELECT count(*) FILTER (WHERE granted) AS held, count(*) FILTER (WHERE NOT granted)
             AS waiting
             FROM pg_locks l JOIN pg_database d ON d.oid = l.database
            WHERE l.locktype = 'advisory' AND d.datname = current_database()
              AND l.classid = $1 AND l.objid = $2 AND l.objsubid = 2"""


async def _locks(conn: asyncpg.Connection, key: int) -> tuple[int, int]:
    row = await conn.fetchrow(LOCKS, BELL_CLASS, key)
    return int(row["held"]), int(row["waiting"])


async def _armed(conn: asyncpg.Connection) -> bool:
    return (await _locks(conn, BELL_KEY))[0] == 1


def _locks_are(conn: asyncpg.Connection, key: int, expected: tuple[int, int]
               ) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await _locks(conn, key) == expected
    return check


def _all_scored(conn: asyncpg.Connection, up_to: int | None = None
                ) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await unscored(conn, up_to=up_to) == 0
    return check


def _doorbell_wakeups(worker: WorkerProcess) -> float:
    return worker.metric("sensor_wakeups_total", 'cause="doorbell"') or 0.0


def _at_least(worker: WorkerProcess, n: float) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await asyncio.to_thread(_doorbell_wakeups, worker) >= n
    return check


class Heard:
    """A LISTEN session of the test's own: how many notifications the writers sent (the
    worker's own, when a pass lasts, come from other sessions)."""

    def __init__(self) -> None:
        self.count = 0
        self.writers: set[int] = set()

    def __call__(self, _conn: Any, pid: int, *_args: Any) -> None:
        if pid in self.writers:
            self.count += 1


async def _one_per_transaction(conn: asyncpg.Connection, machine: int, n: int, seed: int,
                               hold: float = 0.0) -> list[tuple[int, float]]:
    """n single-row writer transactions, each held open up to `hold` s after its INSERT (the
    race: the statement runs while the worker is awake, the commit comes after its last pass);
    (id, time.monotonic() of the commit) each."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        async with conn.transaction():
            rid = await conn.fetchval(INSERT_ONE, json.dumps(reading(seed + i)), machine)
            if hold:
                await asyncio.sleep(rnd.uniform(0, hold))
        out.append((int(rid), time.monotonic()))
    return out


async def test_writers_notify_only_while_the_worker_sleeps_and_nothing_waits(
        chaos_db: Database, chaos_conn: asyncpg.Connection, chaos_models: Models,
        workers: Workers) -> None:
    conn = chaos_conn
    await activate_model(conn, *chaos_models.v1)
    machine = await machine_id(conn)
    worker = workers.start(PREDICTION_BATCH_SIZE="20", PREDICTION_CONCURRENCY="2", **NO_POLL)
    await asyncio.to_thread(worker.wait_ready)
    assert await wait_for(lambda: _armed(conn), timeout=10), worker.logs()[-3000:]
    heard = Heard()
    listener = await chaos_db.connect()
    await listener.add_listener("sensor_readings", heard)
    writers = [await chaos_db.connect() for _ in range(4)]
    heard.writers = {w.get_server_pid() for w in writers}
    try:
        # Asleep: every writer transaction rings (a worker armed holds the bell).
        idle = []
        for k in range(5):
            rearmed = _doorbell_wakeups(worker) + 1
            idle += await _one_per_transaction(writers[0], machine, 1, 10 * k)
            # Scored, and armed again since (the grant's look): asleep before the next one.
            assert await wait_for(_all_scored(conn), timeout=PROMPT_SECONDS)
            await wait_for(_at_least(worker, rearmed), timeout=2)
            assert await _armed(conn)
        await asyncio.sleep(0.1)
        assert heard.count == len(idle) == 5, heard.count

        # Busy: a backlog the worker drains in small batches, while 4 writers commit one row
        # per transaction. The worker is awake (disarmed): the writers do not notify.
        # Large enough to outlast the writers' 200 transactions (the worker drains about
        # 25,000/s here): the phase must be all drain, never caught up.
        await insert_readings(conn, [reading(1000 + i) for i in range(40000)])
        await asyncio.sleep(0.3)  # its notification arrives, the worker disarms
        before = heard.count
        busy = await asyncio.gather(*(_one_per_transaction(w, machine, 50, 2000 + 100 * j)
                                      for j, w in enumerate(writers)))
        during = heard.count - before
        still_waiting = await unscored(conn)
        # More than the writers' own rows still waiting: the backlog outlasted the phase.
        assert still_waiting > 200, "the worker was not busy for the whole phase"
        assert during <= 5, (during, sum(len(b) for b in busy))

        # Bursts that let the worker sleep and wake again and again, with writers that hold
        # their transaction open after the INSERT: none of their readings waits past
        # PROMPT_SECONDS after its commit (the poll is 300 s away).
        assert await wait_for(_all_scored(conn), timeout=20), "readings wait for the poll"
        committed: list[tuple[int, float]] = []
        late: list[tuple[int, float]] = []

        async def watch(stop: asyncio.Event) -> None:
            while not stop.is_set() or committed:
                now = time.monotonic()
                due = [(i, t) for i, t in committed if now - t > PROMPT_SECONDS]
                if due:
                    waiting = {r[0] for r in await conn.fetch(
                        "SELECT r.id FROM readings r WHERE r.id = ANY($1::bigint[]) AND NOT"
                        " EXISTS (SELECT 1 FROM predictions p WHERE p.reading_id = r.id)",
                        [i for i, _ in due])}
                    late.extend((i, now - t) for i, t in due if i in waiting)
                    done = {i for i, _ in due}
                    committed[:] = [(i, t) for i, t in committed if i not in done]
                await asyncio.sleep(0.05)

        async def burst_writer(w: asyncpg.Connection, j: int) -> None:
            rnd = random.Random(j)
            for b in range(12):
                committed.extend(await _one_per_transaction(
                    w, machine, rnd.randint(1, 8), 5000 + 1000 * j + 10 * b, hold=0.03))
                await asyncio.sleep(rnd.uniform(0.0, 0.15))

        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(stop))
        await asyncio.gather(*(burst_writer(w, j) for j, w in enumerate(writers)))
        stop.set()
        await asyncio.wait_for(watcher, 10)
        assert not late, (late[:10], worker.logs()[-3000:])
        doorbell_wakeups = _doorbell_wakeups(worker)
        assert doorbell_wakeups >= 5, doorbell_wakeups  # it slept and re-armed many times
    finally:
        for c in (*writers, listener):
            await c.close()
    assert await wait_settled(conn, 30)
    await check_invariant(conn, served(chaos_models.v1))


async def test_a_standby_takes_the_bell_when_its_holder_is_killed(
        chaos_conn: asyncpg.Connection, chaos_models: Models, workers: Workers) -> None:
    conn = chaos_conn
    await activate_model(conn, *chaos_models.v1)
    holder = workers.start(**NO_POLL)
    await asyncio.to_thread(holder.wait_ready)
    assert await wait_for(lambda: _armed(conn), timeout=10), holder.logs()[-3000:]
    standby = workers.start(**NO_POLL)
    await asyncio.to_thread(standby.wait_ready)
    # The second worker waits for the standby lock, not for the bell (a queued request for the
    # bell would make every writer notify while the holder drains).
    assert await wait_for(_locks_are(conn, STANDBY_KEY, (1, 1)), timeout=10)
    assert await _locks(conn, BELL_KEY) == (1, 0)

    holder.signal(signal.SIGKILL)
    await asyncio.to_thread(holder.wait)
    assert await wait_for(lambda: _armed(conn), timeout=5), standby.logs()[-3000:]
    for k in range(3):
        started = time.monotonic()
        ids = await insert_readings(conn, [reading(100 + k)])
        while await unscored(conn, up_to=ids[0], above=ids[0] - 1) > 0:
            assert time.monotonic() - started < PROMPT_SECONDS, standby.logs()[-3000:]
            await asyncio.sleep(0.01)
        await wait_for(lambda: _armed(conn), timeout=5)
    assert await wait_settled(conn, 30)
    await check_invariant(conn, served(chaos_models.v1))


async def test_transaction_mode_wakes_and_poll_only_has_no_doorbell(
        chaos_db: Database, chaos_conn: asyncpg.Connection, chaos_models: Models,
        workers: Workers) -> None:
    conn = chaos_conn
    await activate_model(conn, *chaos_models.v1)
    # Transaction mode with the listen connection (and so the bell) straight to the server.
    w = workers.start(POSTGRES_POOL_MODE="transaction", POSTGRES_LISTEN_HOST=chaos_db.server.host,
                      POSTGRES_LISTEN_PORT=str(chaos_db.server.port), **NO_POLL)
    await asyncio.to_thread(w.wait_ready)
    assert await wait_for(lambda: _armed(conn), timeout=10), w.logs()[-3000:]
    for k in range(3):
        started = time.monotonic()
        ids = await insert_readings(conn, [reading(k)])
        while await unscored(conn, up_to=ids[0], above=ids[0] - 1) > 0:
            assert time.monotonic() - started < PROMPT_SECONDS, w.logs()[-3000:]
            await asyncio.sleep(0.01)
        await wait_for(lambda: _armed(conn), timeout=5)
    await asyncio.to_thread(w.stop)
    assert await wait_for(_locks_are(conn, BELL_KEY, (0, 0)), timeout=5)

    # POLL_ONLY: no doorbell session, so writers never notify; the poll scores them.
    p = workers.start(POLL_ONLY="true", INFERENCE_INTERVAL_SECONDS="0.5")
    await asyncio.to_thread(p.wait_ready)
    ids = await insert_readings(conn, [reading(50 + i) for i in range(5)])
    assert await wait_for(_all_scored(conn, max(ids)), timeout=5)
    assert await _locks(conn, BELL_KEY) == (0, 0)
    # In this database: other tests' workers run on the chaos cluster beside this one.
    assert await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name ="
                               " 'sensor-predictor-doorbell' AND datname = current_database()"
                               ) == 0
    assert await wait_settled(conn, 30)
    await check_invariant(conn, served(chaos_models.v1))
