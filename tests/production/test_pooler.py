"""Through a real PgBouncer (Debian's, started here on a free port in front of the tier's own
PostgreSQL, with fewer server connections than clients in transaction mode): session mode end to
end, a listener that proves it listens, and configuration errors named, not retried as outages.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from sensor_predictor import db
from sensor_predictor.config import load_settings
from sensor_predictor.connect_errors import ConnectFailed
from sensor_predictor.devtools.postgres import PgServer
from sensor_predictor.devtools.worker_process import WorkerProcess
from sensor_predictor.training import activate_model
from tests.support.chaos import (
    GOOD_ROWS,
    INSERT,
    StreamWriter,
    check_invariant,
    machine_id,
    served,
    wait_settled,
)
from tests.support.chaos_fixtures import LoginRole, Workers
from tests.support.databases import Database
from tests.support.models import Models
from tests.support.pgbouncer import PgBouncer, start_pgbouncer
from tests.support.waiting import wait_for, wait_until

pytestmark = [pytest.mark.asyncio]

BURST = [GOOD_ROWS[i % len(GOOD_ROWS)] for i in range(20_000)]


@pytest.fixture(scope="module")
def session_pool(chaos_pg: PgServer) -> Iterator[PgBouncer]:
    # Session mode gives each client a server connection for its whole session: enough for two
    # workers' pools and listeners (backends are shared across sessions, one after another).
    bouncer = start_pgbouncer(chaos_pg, "session", pool_size=20)
    yield bouncer
    bouncer.stop()


@pytest.fixture(scope="module")
def transaction_pool(chaos_pg: PgServer) -> Iterator[PgBouncer]:
    # As docs/production-postgres.md advises for transaction mode: a client frozen inside a
    # transaction or between the messages of one statement (SIGSTOP, a long pause) holds a
    # server connection, and maybe row locks; the pooler cuts it (idle_transaction_timeout,
    # query_timeout), so that the others and the lease takeover go on.
    bouncer = start_pgbouncer(chaos_pg, "transaction", pool_size=2,
                              settings={"idle_transaction_timeout": "3",
                                        "query_timeout": "5"})
    yield bouncer
    bouncer.stop()


def total(workers: list[WorkerProcess], name: str, labels: str = "") -> float:
    from sensor_predictor.devtools.worker_process import series_value

    return sum(series_value(w.scrape(), name, labels) or 0.0 for w in workers)


async def _own_claim(conn: asyncpg.Connection, worker: WorkerProcess) -> bool:
    return bool(await conn.fetchval(
        "SELECT count(*) FROM scoring_claims WHERE worker LIKE $1", f"%:{worker.pid}:%"))


async def _stop_holding_a_claim(conn: asyncpg.Connection, worker: WorkerProcess) -> None:
    """SIGSTOP the worker at a moment it holds a claim (its claim row is there while it is
    stopped: a kill then leaves it behind for the others to take over)."""
    for _ in range(400):
        worker.signal(signal.SIGSTOP)
        await asyncio.sleep(0.05)  # a statement already sent completes meanwhile
        if await _own_claim(conn, worker):
            return
        worker.signal(signal.SIGCONT)
        await asyncio.sleep(0.01)
    raise AssertionError("never caught the worker with a claim in flight")


@pytest.mark.timeout(600)
async def test_session_mode_two_workers_a_sigkill_and_a_restart(
        chaos_db: Database, chaos_conn: asyncpg.Connection, chaos_models: Models,
        workers: Workers, session_pool: PgBouncer, report: Any) -> None:
    conn = chaos_conn
    await activate_model(conn, *chaos_models.v1)
    env = {**session_pool.env(chaos_db.name), "PREDICTION_CONCURRENCY": "2"}
    a, b = workers.make(**env), workers.make(**env)
    a.start(), b.start()  # both migrate on start, through the pooler (session mode)
    await asyncio.gather(a.until_ready(within=120), b.until_ready(within=120))
    async with StreamWriter(chaos_db.server, chaos_db.name, rows=20, pause=0.01) as writer:
        await asyncio.sleep(1.0)
        await conn.fetch(INSERT, BURST, await machine_id(conn))  # batches in flight
        await _stop_holding_a_claim(conn, a)
        a.signal(signal.SIGKILL)
        a.wait(10)
        killed_at = time.monotonic()
        a.start()
        await a.until_ready(within=120)
        restarted = time.monotonic() - killed_at
        # A model swap, announced by NOTIFY through the pooler's sessions.
        await activate_model(conn, *chaos_models.v2)

        async def swapped() -> bool:
            return bool(await conn.fetchval(
                "SELECT count(*) FROM predictions WHERE model_version = $1",
                str(chaos_models.v2[1])))

        await wait_until(swapped, "predictions of the swapped-in model", timeout=60)
        await asyncio.sleep(0.5)
        stats = await writer.stop()
    assert await wait_settled(conn, timeout=120), (a.tail(), b.tail())
    outcome = await check_invariant(conn, served(chaos_models.v1, chaos_models.v2))
    notified = total([a, b], "sensor_wakeups_total", 'cause="notification"')
    taken_over = total([a, b], "sensor_claims_taken_over_total")
    assert notified > 0, "no wake-up came by notification through the pooler"
    assert taken_over >= 1, "the killed worker's claim was not taken over"
    assert "unsupported startup parameter" not in session_pool.log()
    report(scenario="PgBouncer session: 2 workers, SIGKILL + restart", runs=1,
           readings=stats.committed + len(BURST), lost=outcome.lost,
           duplicated=outcome.duplicated, recovery=f"{restarted:.1f} s to ready",
           detail=f"notification wake-ups {notified:.0f}, claims taken over {taken_over:.0f}, "
                  "a model swap")


@pytest.mark.timeout(300)
async def test_transaction_mode_without_a_listen_connection_refuses_to_start(
        chaos_db: Database, workers: Workers, transaction_pool: PgBouncer) -> None:
    """POSTGRES_POOL_MODE=transaction and the LISTEN connection left at its default (the
    transaction pooler itself): the worker proves LISTEN does not hear, says so and exits 2."""
    worker = workers.start(**transaction_pool.env(chaos_db.name),
                           POSTGRES_POOL_MODE="transaction")
    code = await asyncio.to_thread(worker.wait, 30)
    assert code == 2, worker.tail()
    refused = [e for e in worker.events() if e.get("event") == "listen_connection_unusable"]
    assert refused and refused[0]["cause"] == "listen_deaf", worker.tail()
    assert "POSTGRES_LISTEN_HOST" in refused[0]["error"]
    start = next(e for e in worker.events() if e.get("event") == "database_connection")
    assert start["pool_mode"] == "transaction" and "off" in start["statement_cache"]


@pytest.mark.timeout(300)
async def test_a_listener_behind_a_transaction_pool_is_found_deaf(
        chaos_db: Database, chaos_conn: asyncpg.Connection, chaos_models: Models,
        workers: Workers, transaction_pool: PgBouncer) -> None:
    """The listen connection (only) goes through the transaction pool, where other clients
    share its two server connections: its heartbeat finds the LISTEN gone or on another server
    session, logs why, reconnects and counts it; it is not trusted."""
    await activate_model(chaos_conn, *chaos_models.v1)
    worker = workers.start(POSTGRES_LISTEN_HOST=transaction_pool.host,
                           POSTGRES_LISTEN_PORT=str(transaction_pool.port),
                           HEARTBEAT_SECONDS="1")
    await worker.until_ready(within=120, key="listening")
    settings = load_settings(transaction_pool.env(chaos_db.name))
    others = [await db.connect(settings, statement_cache_size=0, application_name="other-app")
              for _ in range(3)]
    machine = await machine_id(chaos_conn)
    started = time.monotonic()

    async def deaf() -> float:
        # Other applications' transactions on the shared server connections, and new readings
        # (whose notifications nobody hears).
        await asyncio.gather(*(o.fetchval("SELECT pg_sleep(0.02)") for o in others))
        await chaos_conn.fetch(INSERT, GOOD_ROWS[:5], machine)
        return await asyncio.to_thread(worker.metric, "sensor_listener_deaf_total") or 0.0

    try:
        found = await wait_for(deaf, timeout=30, interval=0.2)
    finally:
        for o in others:
            await o.close()
    assert found and found >= 1, worker.tail()
    seconds = time.monotonic() - started
    events = [e for e in worker.events() if e.get("event") == "listener_deaf"]
    assert events and "transaction" in events[0]["reason"], events
    report_line = f"deaf listener found in {seconds:.1f} s"
    print(report_line)


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "PG"))}
    return subprocess.run([sys.executable, "-m", "sensor_predictor.cli", *args],
                          env={**base, **env}, capture_output=True, text=True, timeout=60)


@pytest.mark.timeout(300)
async def test_login_errors_are_named_not_retried(
        chaos_db: Database, login_role: LoginRole, session_pool: PgBouncer, workers: Workers,
        tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    as_role = {**chaos_db.env(), "POSTGRES_USER": login_role.name, "POSTGRES_PASSWORD": ""}
    cases = {
        "bad password": ({**as_role, "POSTGRES_PASSWORD_FILE": str(wrong)},
                         "refused the login", "POSTGRES_PASSWORD"),
        "no such role": ({**chaos_db.env(), "POSTGRES_USER": "sp_nobody"},
                         "no such role", "POSTGRES_USER"),
        "no such database": ({**chaos_db.env(), "POSTGRES_DB": "sp_no_such_db"},
                             "no such database", "POSTGRES_DB"),
        "pooler: unknown user": ({**session_pool.env(chaos_db.name),
                                  "POSTGRES_USER": "sp_nobody"},
                                 "refused the login", "POSTGRES_USER"),
        "pooler: no such database": (session_pool.env("sp_no_such_db"), "no such database",
                                     "POSTGRES_DB"),
    }
    results = await asyncio.gather(*(asyncio.to_thread(_cli, env, "migrate")
                                     for env, _, _ in cases.values()))
    for (name, (_, words, variable)), done in zip(cases.items(), results, strict=True):
        last = done.stderr.strip().splitlines()[-1]
        assert done.returncode == 2, (name, done.stderr[-1500:])
        assert words in last and variable in last, (name, last)

    # A pooler refuses any startup parameter but application_name (what the worker used to
    # send): named, not an outage. The worker itself sends none (the session test runs).
    with pytest.raises(ConnectFailed) as refused:
        await db.connect(load_settings(session_pool.env(chaos_db.name)),
                         server_settings={"jit": "off"})
    assert refused.value.cause.kind == "startup_parameter_refused", refused.value.cause
    assert not refused.value.cause.transient

    # `run` names it once per retry, with backoff, and /ready says it.
    worker = workers.start("--no-migrate", **cases["bad password"][0])

    async def missing() -> str | None:
        state = await asyncio.to_thread(worker.ready)
        said = None if not state else state.get("missing", {}).get("database")
        # Until its first attempt fails, /ready says only that it is not connected yet.
        return None if said == "not connected yet" else said

    said = await wait_until(missing, "/ready naming the refused login", timeout=30)
    assert "refused the login" in said and "POSTGRES_PASSWORD" in said
    await asyncio.sleep(2)
    events = [e for e in worker.events()
              if e.get("event") in ("database_misconfigured", "database_unavailable")]
    assert events and {e["event"] for e in events} == {"database_misconfigured"}, events
    delays = [e["retry_in_s"] for e in events]
    assert delays == sorted(delays) and len(delays) < 10, delays  # backing off


ADVISORY_LOCKS = ("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
                  "(SELECT oid FROM pg_database WHERE datname = current_database())"
                  # (21328, -1): a claim in flight, for its transaction only (sp_orphans' mark)
                  " AND NOT (classid = 21328 AND objid = 4294967295 AND objsubid = 2)"
                  # (21329, 2) and (21329, 3): the doorbell's, on its own direct session
                  " AND NOT (classid = 21329 AND objid IN (2, 3) AND objsubid = 2)")
LEASE = 2.0


@pytest.mark.timeout(600)
async def test_transaction_mode_with_a_direct_listen_exactly_once_through_kill_and_freeze(
        chaos_db: Database, chaos_conn: asyncpg.Connection, chaos_models: Models,
        workers: Workers, transaction_pool: PgBouncer, report: Any) -> None:
    """Two workers through the transaction pool (2 server connections for ~10 clients), LISTEN
    direct, migrations on start (over the listen connection): a SIGKILL and a restart, then a
    worker frozen (SIGSTOP) longer than its lease: its claim is taken over, its late results
    are discarded and counted, every reading scored exactly once, no advisory lock left."""
    conn = chaos_conn
    await activate_model(conn, *chaos_models.v1)
    env = {**transaction_pool.env(chaos_db.name), "POSTGRES_POOL_MODE": "transaction",
           "POSTGRES_LISTEN_HOST": chaos_db.server.host,
           "POSTGRES_LISTEN_PORT": str(chaos_db.server.port),
           "CLAIM_LEASE_SECONDS": str(LEASE), "PREDICTION_CONCURRENCY": "2"}
    a, b = workers.make(**env), workers.make(**env)
    a.start(), b.start()
    await asyncio.gather(a.until_ready(within=120), b.until_ready(within=120))
    for w in (a, b):
        names = {e.get("event") for e in w.events()}
        assert {"listen_connection_verified", "migrations_over_listen_connection"} <= names
    locks_seen: list[int] = []
    machine = await machine_id(conn)
    async with StreamWriter(chaos_db.server, chaos_db.name, rows=20, pause=0.01) as writer:
        await asyncio.sleep(1.0)
        # 1. SIGKILL of a worker holding a claim, and its restart.
        await conn.fetch(INSERT, BURST, machine)
        await _stop_holding_a_claim(conn, a)
        a.signal(signal.SIGKILL)
        a.wait(10)
        a.start()
        await a.until_ready(within=120)
        locks_seen.append(int(await conn.fetchval(ADVISORY_LOCKS)))
        # 2. SIGSTOP longer than the lease while it holds a claim.
        await conn.fetch(INSERT, BURST, machine)
        mine = f"%:{b.pid}:%"
        claim_id = None
        for _ in range(400):
            b.signal(signal.SIGSTOP)
            await asyncio.sleep(0.05)
            claim_id = await conn.fetchval(
                "SELECT id FROM scoring_claims WHERE worker LIKE $1", mine)
            if claim_id is not None:
                break
            b.signal(signal.SIGCONT)
            await asyncio.sleep(0.01)
        assert claim_id is not None, "never caught the worker with a claim in flight"
        frozen_at = time.monotonic()
        try:
            async def taken_over() -> bool:
                owner = await conn.fetchval("SELECT worker FROM scoring_claims WHERE id = $1",
                                            claim_id)
                return owner is None or f":{b.pid}:" not in owner

            if not await wait_for(taken_over, timeout=LEASE + 15, interval=0.02):
                sessions = await conn.fetch(
                    "SELECT pid, application_name, state, wait_event_type, wait_event,"
                    " left(query, 120) AS query, now() - xact_start AS xact_age"
                    " FROM pg_stat_activity WHERE datname = current_database()")
                claims = await conn.fetch("SELECT * FROM scoring_claims")
                raise AssertionError(
                    f"claim {claim_id} not taken over:\n" + "\n".join(map(str, sessions))
                    + "\n" + "\n".join(map(str, claims)) + "\n"
                    + transaction_pool.log()[-2000:])
            takeover_s = time.monotonic() - frozen_at
            locks_seen.append(int(await conn.fetchval(ADVISORY_LOCKS)))
            await asyncio.sleep(0.5)
        finally:
            b.signal(signal.SIGCONT)
        await asyncio.sleep(1.0)
        stats = await writer.stop()
    assert await wait_settled(conn, timeout=120), (a.tail(), b.tail())
    outcome = await check_invariant(conn, served(chaos_models.v1))

    async def late_counted() -> float:
        return await asyncio.to_thread(b.metric, "sensor_claim_late_results_total") or 0.0

    late = await wait_for(late_counted, timeout=15, interval=0.2)
    # Frozen between two statements, the worker writes late on SIGCONT and the write is
    # discarded and counted. Frozen inside one, PgBouncer's query_timeout has cut that server
    # connection meanwhile: on SIGCONT its statement fails (database_unavailable) and nothing
    # is written at all. Either way the new owner's results are the only ones (checked above).
    cut = any(e.get("event") == "database_unavailable" for e in b.events())
    assert (late and late > 0) or cut, b.tail()
    assert max(locks_seen) == 0 and await conn.fetchval(ADVISORY_LOCKS) == 0, locks_seen
    notified = total([a, b], "sensor_wakeups_total", 'cause="notification"')
    taken = total([a, b], "sensor_claims_taken_over_total")
    assert notified > 0 and taken >= 1, (notified, taken)
    for w in (a, b):
        events = {e.get("event") for e in w.events()}
        assert "listener_deaf" not in events
    report(scenario="PgBouncer transaction, LISTEN direct: kill, restart, freeze",
           runs=1, readings=stats.committed + 2 * len(BURST), lost=outcome.lost,
           duplicated=outcome.duplicated, recovery=f"takeover {takeover_s:.1f} s",
           detail=f"lease {LEASE:g} s, late results discarded {late:.0f}"
                  f"{'' if late else ' (its statement was cut by query_timeout)'}, notification "
                  f"wake-ups {notified:.0f}, claims taken over {taken:.0f}")


@pytest.mark.timeout(300)
async def test_poll_only_through_the_transaction_pool(
        chaos_db: Database, chaos_conn: asyncpg.Connection, chaos_models: Models,
        workers: Workers, transaction_pool: PgBouncer) -> None:
    """The documented exception: POLL_ONLY=true, no listen connection at all. Migrations are
    checked through the pooler and skipped (all applied; the log says so), and readings are
    scored by polling."""
    await activate_model(chaos_conn, *chaos_models.v1)
    worker = workers.start(**transaction_pool.env(chaos_db.name),
                           POSTGRES_POOL_MODE="transaction", POLL_ONLY="true",
                           INFERENCE_INTERVAL_SECONDS="1")
    state = await worker.until_ready(within=120)
    assert state.get("poll_only") is True, state

    async def polls() -> float:
        return await asyncio.to_thread(worker.metric, "sensor_wakeups_total",
                                       'cause="poll"') or 0.0

    # The readings come once the start's own wake-ups are over: only a poll can find them.
    assert await wait_for(polls, timeout=10, interval=0.2), worker.tail()
    await chaos_conn.fetch(INSERT, GOOD_ROWS[:50], await machine_id(chaos_conn))
    assert await wait_settled(chaos_conn, timeout=30), worker.tail()
    await check_invariant(chaos_conn, served(chaos_models.v1))
    events = {e.get("event") for e in worker.events()}
    assert {"migrations_skipped", "poll_only"} <= events and "listening" not in events
    assert (worker.metric("sensor_wakeups_total", 'cause="notification"') or 0) == 0
