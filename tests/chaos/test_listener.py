"""The LISTEN connection lost: its backend terminated, or its path gone half-open."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import subprocess
import time
import weakref
from collections import Counter
from typing import Any

import asyncpg
import pytest

from sensor_predictor.devtools.worker_process import WorkerProcess
from sensor_predictor.training import activate_model
from tests.support.chaos import FreezableProxy, check_invariant, served, unscored, wait_settled
from tests.support.chaos_fixtures import Workers
from tests.support.databases import Database
from tests.support.models import Models
from tests.support.readings import insert_readings, reading

pytestmark = [pytest.mark.asyncio, pytest.mark.chaos]

# The poll is 5 minutes away in these tests: only a notification can explain a quick score.
NO_POLL = {"INFERENCE_INTERVAL_SECONDS": "300", "HEARTBEAT_SECONDS": "3"}
HEARTBEAT_NOTICE_SECONDS = 10.0
SCORED_QUICKLY_SECONDS = 2.0
# The half-open test's bound for the freeze's backlog: noticed within HEARTBEAT_NOTICE_SECONDS,
# then scored quickly; beyond this it fails with a diagnosis.
CATCH_UP_WAIT_SECONDS = 40.0


async def _listener_pids(conn: asyncpg.Connection) -> list[int]:
    return [r[0] for r in await conn.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'sensor-predictor-listener'"
        " AND datname = current_database()")]


def _reconnects(worker: WorkerProcess) -> float:
    return worker.metric("sensor_db_reconnects_total", 'connection="listener"') or 0.0


async def _wait_reconnects(worker: WorkerProcess, at_least: float, timeout: float  # noqa: ASYNC109
                           ) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await asyncio.to_thread(_reconnects, worker) >= at_least:
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    return None


async def _diagnosis(conn: asyncpg.Connection, worker: Any, what: str) -> str:
    """What a stuck recovery looks like: the worker's wake-ups and log, the database's
    sessions, advisory locks and open claims."""
    sessions = await conn.fetch(
        "SELECT pid, application_name, state, wait_event_type, wait_event,"
        " left(query, 60) AS query FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()")
    locks = await conn.fetch(
        "SELECT pid, classid, objid, mode, granted FROM pg_locks WHERE locktype = 'advisory'")
    claims = await conn.fetch("SELECT * FROM scoring_claims")
    metrics = {}
    with contextlib.suppress(Exception):
        metrics = {k: v for k, v in worker.scrape().items() if "wakeups" in k or "reconnect" in k}
    return (f"{what} not scored\nmetrics {metrics}\nsessions {[dict(r) for r in sessions]}\n"
            f"advisory locks {[dict(r) for r in locks]}\nclaims {[dict(r) for r in claims]}\n"
            f"{worker.logs()[-4000:]}")


async def _score_time(conn: asyncpg.Connection, n: int, seed: int, timeout: float = 30  # noqa: ASYNC109
                      ) -> float:
    """Insert n readings and return how long until all of them have a result."""
    started = time.monotonic()
    ids = await insert_readings(conn, [reading(seed + i) for i in range(n)])
    while await unscored(conn, up_to=max(ids), above=min(ids) - 1) > 0:
        if time.monotonic() - started > timeout:
            return float("inf")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


async def test_listener_backend_terminated_reconnects_and_catches_up(
        chaos_conn: asyncpg.Connection, chaos_models: Models, workers: Workers,
        report: Any) -> None:
    conn = chaos_conn
    await activate_model(conn, *chaos_models.v1)
    worker = workers.start(**NO_POLL)
    await asyncio.to_thread(worker.wait_ready)
    assert await _score_time(conn, 10, 0) < SCORED_QUICKLY_SECONDS

    [pid] = await _listener_pids(conn)
    assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
    # Written while nobody listens: their notification is lost, the reconnect must catch up.
    during = await insert_readings(conn, [reading(100 + i) for i in range(10)])
    reconnected = await _wait_reconnects(worker, 1, timeout=15)
    assert reconnected is not None, worker.logs()[-3000:]
    new_pids = await _listener_pids(conn)
    assert len(new_pids) == 1 and new_pids != [pid], new_pids
    started = time.monotonic()
    while await unscored(conn, up_to=max(during)) > 0:
        assert time.monotonic() - started < 10, worker.logs()[-3000:]
        await asyncio.sleep(0.01)
    after = [await _score_time(conn, 10, 200 + 10 * k) for k in range(5)]
    assert max(after) < SCORED_QUICKLY_SECONDS, after
    assert (worker.metric("sensor_wakeups_total", 'cause="poll"') or 0) == 0

    assert await wait_settled(conn, 10)
    outcome = await check_invariant(conn, served(chaos_models.v1), 70)
    report(scenario="3a. listener backend terminated", runs=1, readings=outcome.tally.readings,
           lost=outcome.lost, duplicated=outcome.duplicated,
           recovery=(f"reconnect seen in metrics after {reconnected:.2f} s; readings after "
                     f"recovery scored in max {max(after) * 1000:.0f} ms (poll at 300 s)"))


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_half_open_connection_heartbeat_notices_and_reconnects(
        chaos_db: Database, chaos_conn: asyncpg.Connection, chaos_models: Models,
        workers: Workers, report: Any) -> None:
    """Every connection of the worker goes through a proxy the test controls; the proxy stops
    forwarding on all of them at once without closing a socket. New connections (a reconnect)
    take a fresh path that forwards again."""
    conn = chaos_conn  # the test's own connection goes straight to PostgreSQL
    await activate_model(conn, *chaos_models.v1)
    proxy = FreezableProxy(chaos_db.server.host, chaos_db.server.port).start()
    try:
        lanes = 4
        worker = workers.start(POSTGRES_PORT=str(proxy.port), PREDICTION_CONCURRENCY=str(lanes),
                               PREDICTION_BATCH_SIZE="50", **NO_POLL)
        await asyncio.to_thread(worker.wait_ready)
        # A burst that keeps every lane busy at once: the pool holds a connection per lane.
        await insert_readings(conn, [reading(i) for i in range(3000)])
        assert await wait_settled(conn, 30)
        assert await _score_time(conn, 10, 5000) < SCORED_QUICKLY_SECONDS

        frozen = proxy.freeze()
        frozen_at = time.monotonic()
        # The listener and a pooled connection per lane: the pool has no healthy one left.
        assert frozen >= 1 + lanes, frozen
        during = await insert_readings(conn, [reading(100 + i) for i in range(10)])
        noticed = await _wait_reconnects(worker, 1, timeout=HEARTBEAT_NOTICE_SECONDS + 5)
        assert noticed is not None and noticed <= HEARTBEAT_NOTICE_SECONDS, (
            noticed, worker.logs()[-3000:])
        events = [e for e in worker.events() if e.get("event") == "listener_connection_failed"]
        assert any("heartbeat" in str(e.get("error")) for e in events), events
        # What was written while the path was dead is caught up after the reconnect...
        caught_up = None
        while caught_up is None and time.monotonic() - frozen_at < CATCH_UP_WAIT_SECONDS:
            if await unscored(conn, up_to=max(during)) == 0:
                caught_up = time.monotonic() - frozen_at
            await asyncio.sleep(0.05)
        # (Bounded waits, well within the test's timeout: a run that does not recover fails
        # with what the worker and the server were doing, not with a timeout's stack.)
        assert caught_up is not None, await _diagnosis(conn, worker, "backlog of the freeze")
        # ... and what is written afterwards is scored by notification, quickly.
        after = []
        for k in range(5):
            after.append(await _score_time(conn, 10, 200 + 10 * k, timeout=15))
            assert after[-1] < 15, await _diagnosis(conn, worker, f"readings after, {after}")
        row = report(scenario="3b. half-open path (proxy stops forwarding)", runs=1,
               readings=3070, lost="-", duplicated="-",
               recovery=(f"heartbeat noticed + reconnected {noticed:.2f} s after the freeze; "
                         f"backlog of the freeze scored "
                         + (f"{caught_up:.2f} s" if caught_up else "NOT within 90 s")
                         + " after it; later readings scored in "
                         + "/".join(f"{x:.2f}" for x in after) + " s"),
               detail=f"{frozen} connections frozen, proxy accepted {proxy.accepted} in all")
        assert caught_up is not None and caught_up <= noticed + SCORED_QUICKLY_SECONDS, (
            caught_up, noticed, worker.logs()[-3000:])
        assert max(after) < SCORED_QUICKLY_SECONDS, after
        assert await wait_settled(conn, 10)
        outcome = await check_invariant(conn, served(chaos_models.v1), 3070)
        row.update(readings=outcome.tally.readings, lost=outcome.lost,
                   duplicated=outcome.duplicated)
        # The frozen connections are still there, half-open: SIGTERM must still end the
        # worker promptly (the standard of every stop: exit 0 within 5 s).
        worker.signal(signal.SIGTERM)
        signalled = time.monotonic()
        try:
            code: int | None = await asyncio.to_thread(worker.wait, 15)
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - signalled
        row["detail"] += f"; SIGTERM after recovery: exit {code} in {took:.1f} s"
        assert code == 0 and took < 5, (code, took, worker.logs()[-2000:])
    finally:
        workers.stop_all()
        await asyncio.to_thread(proxy.close)



@pytest.mark.timeout(120)
async def test_listener_survives_a_heartbeat_racing_its_backends_termination(
        chaos_db: Database, monkeypatch: pytest.MonkeyPatch, report: Any) -> None:
    """The server ends the listen session (pg_terminate_backend: an operator, a failover, an
    idle-session timeout) just as a heartbeat starts. asyncpg then raises, depending on a
    millisecond, ConnectionDoesNotExistError, InterfaceError or InternalClientError ("cannot
    switch to state 11; another operation (2) is in progress"); every one of them must lead to a
    reconnect. In-process: the real Listener against the chaos cluster, the race widened by
    terminating the backend right before each heartbeat query."""
    from sensor_predictor.config import load_settings
    from sensor_predictor.listener import Listener

    settings = load_settings({**chaos_db.env(), "HEARTBEAT_SECONDS": "0.05"})
    connected: list[bool] = []
    listener = Listener(settings, on_readings=lambda: None, on_model=lambda: None,
                        on_connected=connected.append, on_lost=lambda: None)
    admin = await chaos_db.connect()
    from sensor_predictor import db

    heartbeat = db.queries()["heartbeat"]
    checked: weakref.WeakSet[Any] = weakref.WeakSet()
    real_fetchrow = asyncpg.connection.Connection.fetchrow
    raised: Counter[str] = Counter()
    rnd = random.Random(3)

    async def heartbeat_meets_termination(self: Any, query: str, *args: Any, **kw: Any) -> Any:
        # The first heartbeat of a connection is its check that LISTEN took: the race is with
        # the later ones.
        first = self not in checked
        checked.add(self)
        if query == heartbeat and not first:
            await admin.execute("SELECT pg_terminate_backend($1)", self.get_server_pid())
            await asyncio.sleep(rnd.uniform(0, 0.003))
            try:
                return await real_fetchrow(self, query, *args, **kw)
            except Exception as exc:
                raised[type(exc).__name__] += 1
                raise
        return await real_fetchrow(self, query, *args, **kw)

    monkeypatch.setattr(asyncpg.connection.Connection, "fetchrow", heartbeat_meets_termination)
    task = asyncio.create_task(listener.run())
    cycles = 25
    try:
        deadline = time.monotonic() + 60
        while len(connected) < cycles + 1 and not task.done() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        died = task.exception() if task.done() else None
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        monkeypatch.undo()
        await admin.close()
    report(scenario="3c. heartbeat racing a backend termination", runs=len(connected) - 1,
           readings="-", lost="-", duplicated="-", recovery="n/a",
           detail=(f"asyncpg raised {dict(raised)}; listener task "
                   + (f"DIED with {type(died).__name__}: {died}" if died else "kept reconnecting")))
    assert died is None, f"the listener task died after {len(connected) - 1} reconnects: {died!r}"
    assert len(connected) >= cycles + 1, (connected, raised)
