"""SIGTERM is obeyed within SHUTDOWN_GRACE_SECONDS whatever the worker is stuck on (issue 23,
findings 4 and 5): a migration whose CREATE INDEX CONCURRENTLY waits for an idle transaction, an
MLflow server that accepts and never answers, a lane whose write waits for a table lock. What
was left behind is resumed by the next worker: the index rebuilt, the claim taken over."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from sensor_predictor.devtools.worker_process import WorkerProcess
from sensor_predictor.training import activate_model
from tests.support.chaos import GOOD_ROWS, check_invariant, machine_id, served, wait_settled
from tests.support.chaos_fixtures import Workers
from tests.support.databases import Database
from tests.support.models import Models
from tests.support.readings import INSERT_READINGS
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.asyncio, pytest.mark.chaos]

GRACE = 8.0  # the default SHUTDOWN_GRACE_SECONDS


async def _term_and_time(worker: WorkerProcess) -> tuple[float, int]:
    started = time.monotonic()
    worker.signal(signal.SIGTERM)
    code = await asyncio.to_thread(worker.wait, 20)
    return time.monotonic() - started, code


async def _event(worker: WorkerProcess, name: str, within: float) -> dict[str, Any]:
    async def seen() -> dict[str, Any] | None:
        return next((e for e in worker.events() if e.get("event") == name), None)

    found = await wait_for(seen, timeout=within, interval=0.1)
    assert found, (name, worker.tail(3000))
    return found  # type: ignore[no-any-return]


@pytest.mark.slow
async def test_sigterm_during_a_blocked_migration_and_the_next_start_rebuilds_the_index(
        chaos_db: Database, chaos_conn: asyncpg.Connection, chaos_models: Models,
        workers: Workers) -> None:
    conn = chaos_conn
    await activate_model(conn, *chaos_models.v1)
    # Migration 0004 not applied yet (an adopted database), and an ORM session idle in a
    # REPEATABLE READ transaction: CREATE INDEX CONCURRENTLY waits for its snapshot.
    await conn.execute("DROP INDEX readings_machine_id_idx")
    await conn.execute("DELETE FROM schema_migrations WHERE version = 4")
    idle = await chaos_db.connect()
    await idle.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    await idle.fetchval("SELECT count(*) FROM readings")
    idle_pid = idle.get_server_pid()
    try:
        first = workers.start()
        waiting = await _event(first, "index_build_waiting", within=30)
        assert waiting["index"] == "readings_machine_id_idx"
        assert idle_pid in [b["pid"] for b in waiting["blockers"]], waiting
        assert all(b["state"] == "idle in transaction" and b["xact_start"]
                   for b in waiting["blockers"] if b["pid"] == idle_pid), waiting
        # Another replica gives up on the migration lock after its bound, with a reason.
        second = workers.start(MIGRATION_WAIT_SECONDS="1.5")
        assert await asyncio.to_thread(second.wait, 20) == 1, second.tail()
        gave_up = await _event(second, "migration_failed", within=1)
        assert gave_up["reason"] == "migration_lock_timeout", gave_up
        took, code = await _term_and_time(first)
        assert took < GRACE and code == 0, (took, code, first.tail())
        await _event(first, "migration_interrupted", within=1)
    finally:
        await idle.close()
    # The build left an INVALID index; the next start drops it, builds it, and serves.
    third = workers.start()
    await asyncio.to_thread(third.wait_ready)
    assert await conn.fetchval(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = 'readings_machine_id_idx'::regclass")
    assert await conn.fetchval("SELECT count(*) FROM schema_migrations WHERE version = 4") == 1
    assert [e for e in third.events() if e.get("event") == "invalid_index_rebuilt"]


@contextlib.contextmanager
def _silent_server() -> Iterator[str]:
    """An HTTP server that accepts connections and never answers (a hung MLflow)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@pytest.mark.slow
async def test_sigterm_during_a_hung_mlflow_fetch(
        chaos_db: Database, chaos_conn: asyncpg.Connection, chaos_models: Models,
        workers: Workers) -> None:
    await activate_model(chaos_conn, *chaos_models.v1)
    with _silent_server() as uri:
        worker = workers.start(MLFLOW_TRACKING_URI=uri, MODEL_CACHE_DIR="off")
        await _event(worker, "listening", within=30)
        await asyncio.sleep(1.0)  # the fetch has started, and hangs
        assert worker.ready() is not None and not worker.ready()["ready"]  # type: ignore[index]
        took, code = await _term_and_time(worker)
    assert took < GRACE, (took, worker.tail())
    assert code == 0, worker.tail()


@pytest.mark.slow
async def test_sigterm_with_a_stuck_lane_and_its_claim_is_taken_over(
        chaos_db: Database, chaos_conn: asyncpg.Connection, chaos_models: Models,
        workers: Workers) -> None:
    conn = chaos_conn
    await activate_model(conn, *chaos_models.v1)
    # A shorter grace than the default: the setting is obeyed, and the test is quicker.
    worker = workers.start(SHUTDOWN_GRACE_SECONDS="4")
    await asyncio.to_thread(worker.wait_ready)
    machine = await machine_id(conn, "stuck")
    blocker = await chaos_db.connect()
    await blocker.execute("BEGIN")
    await blocker.execute("LOCK TABLE predictions IN SHARE MODE")  # every write waits
    try:
        await conn.fetch(INSERT_READINGS, GOOD_ROWS[:20], machine)
        stuck = await wait_for(lambda: conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'sensor-predictor'"
            " AND wait_event_type = 'Lock'"), timeout=10, interval=0.05)
        assert stuck, worker.tail()
        took, code = await _term_and_time(worker)
        assert took < 4 and code == 0, (took, code, worker.tail())
        assert [e for e in worker.events() if e.get("event") == "lanes_cancelled"]
    finally:
        await blocker.execute("ROLLBACK")
        await blocker.close()
    # The claim the lane held is taken over by the next worker, scored once.
    nxt = workers.start()
    await asyncio.to_thread(nxt.wait_ready)
    assert await wait_settled(conn, 20), nxt.tail()
    await check_invariant(conn, served(chaos_models.v1), expected_readings=20)
