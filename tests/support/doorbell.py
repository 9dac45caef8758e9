"""The doorbell as a test sees it (migrations/0013_doorbell.sql): is a worker asleep, armed?"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import asyncpg

from sensor_predictor.devtools.worker_process import WorkerProcess
from sensor_predictor.doorbell import BELL_CLASS, BELL_KEY
from tests.support.waiting import wait_for

HELD = ("SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
        " WHERE l.locktype = 'advisory' AND d.datname = current_database() AND l.granted"
        " AND l.classid = $1 AND l.objid = $2 AND l.objsubid = 2")


async def armed(conn: asyncpg.Connection) -> bool:
    """A worker holds the bell: it sleeps, and the next writer transaction notifies."""
    return bool(await conn.fetchval(HELD, BELL_CLASS, BELL_KEY))


def notification_wakeups(worker: WorkerProcess) -> float:
    return worker.metric("sensor_wakeups_total", 'cause="notification"') or 0


async def until_a_notification(conn: asyncpg.Connection, worker: WorkerProcess,
                               batch: Callable[[], Awaitable[None]], tries: int = 5) -> None:
    """Run `batch` (an insert, then the test's wait for its scores) while the worker holds the
    bell, until one batch wakes it by notification. The bell is given up and asked for again
    around every pass (the model's swap at start is one), so a batch may fall between a
    release and the next grant and be found by the grant's look instead: nothing waits then
    either, but it proves nothing about notifications."""
    for _ in range(tries):
        assert await wait_for(lambda: armed(conn), timeout=10)
        before = notification_wakeups(worker)
        await batch()
        if notification_wakeups(worker) > before:
            return
    raise AssertionError(f"no batch of {tries} woke the worker by notification:\n"
                         f"{worker.scrape()}")
