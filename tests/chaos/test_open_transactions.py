"""Transactions left open while readings stream: in another database, in ours with readings of
its own, idle in transaction, prepared (two-phase). Nobody else's readings may wait for them.

The two long holds run beside other tests, each in a thread of its own with its own database
and worker (tests.support.background): the 60 s one from the chaos tier's first test on
(tests/chaos/conftest.py), the 30 s prepared one from this module's first test; each test
below that names one takes its outcome."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from sensor_predictor.devtools.mlflow_server import MlflowServer
from sensor_predictor.devtools.postgres import PgServer
from sensor_predictor.training import activate_model
from tests.support.background import Background
from tests.support.chaos import (
    GOOD_ROWS,
    INSERT,
    check_invariant,
    machine_id,
    served,
    wait_settled,
)
from tests.support.chaos_fixtures import Workers
from tests.support.databases import Database, clone, drop
from tests.support.fixtures import model_cache_env
from tests.support.models import Models
from tests.support.open_transactions import (
    check_normal,
    latencies,
    prepared_transaction_left_30_s,
    stream_while,
)
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.asyncio, pytest.mark.chaos]

PREPARED_30_S = "test_a_prepared_transaction_left_for_30_s"


@pytest.fixture(scope="module", autouse=True)
def prepared_30_s(request: pytest.FixtureRequest, chaos_pg: PgServer, chaos_template: str,
                  chaos_models: Models, mlflow_server: MlflowServer, shared_model_cache: Path,
                  tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[Background[dict[str, Any]] | None]:
    """Scenario 13 under way beside this module's other tests, when its test is selected (on
    the tier's cluster: it has max_prepared_transactions)."""
    if not any(item.name == PREPARED_30_S and item.module is request.module
               for item in request.session.items):
        yield None
        return
    db = clone(chaos_pg, chaos_template, prefix="chaos_")
    workers = Workers(db, mlflow_server, tmp_path_factory.mktemp("prepared-30-s"),
                      base=model_cache_env(request, shared_model_cache))
    scenario = Background("prepared-30-s", lambda: prepared_transaction_left_30_s(
        db, chaos_models, workers))
    try:
        yield scenario
    finally:
        if not scenario.done():  # its test did not take its outcome (the run was cut short)
            workers.stop_all()
        scenario.join()
        workers.stop_all()
        drop(db)


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_open_writers_and_idle_sessions_in_our_database(
        chaos_db: Database, chaos_conn: asyncpg.Connection, chaos_models: Models,
        workers: Workers, report: Any) -> None:
    """A transaction that inserts readings and stays open 10 s: everybody else is scored at
    normal latency meanwhile, its own readings within 1 s of its commit. Beside it, a session
    idle in transaction after a read (a snapshot held) and one after a write elsewhere."""
    conn = chaos_conn
    await activate_model(conn, *chaos_models.v1)
    worker = workers.start(HEARTBEAT_SECONDS="1")
    await asyncio.to_thread(worker.wait_ready)
    slow, idle_read, idle_write = [await chaos_db.connect() for _ in range(3)]
    try:
        await idle_read.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        await idle_read.fetchval("SELECT count(*) FROM readings")  # holds its snapshot
        await idle_write.execute("BEGIN")
        await idle_write.execute("INSERT INTO machines (machine_id) VALUES ('orm-session')")
        await slow.execute("BEGIN")
        own_ids = [r["id"] for r in await slow.fetch(
            INSERT, GOOD_ROWS[:25], await machine_id(slow, "slow-batch"))]
        writer, first, last = await stream_while(chaos_db, conn, hold_seconds=10)
        found = await latencies(conn, first, last)
        # The operator's view: one open transaction holds readings back, and for how long.
        waiting = worker.metric("sensor_open_reading_transactions")
        age = worker.metric("sensor_open_reading_transaction_age_seconds")
        assert waiting == 1, waiting
        assert age is not None and age >= 5, age
        assert await conn.fetchval(
            "SELECT count(*) FROM predictions WHERE reading_id = ANY($1::bigint[])",
            own_ids) == 0
        await slow.execute("COMMIT")
        committed = time.monotonic()
        assert await wait_for(lambda: _all_predicted(conn, own_ids), timeout=1.0), \
            worker.logs()[-3000:]
        own_delay = time.monotonic() - committed
    finally:
        for c in (slow, idle_read, idle_write):
            with contextlib.suppress(Exception):
                await c.execute("ROLLBACK")
            await c.close()
    stats = await writer.stop()
    assert await wait_settled(conn, 30), worker.logs()[-3000:]
    outcome = await check_invariant(conn, served(chaos_models.v1),
                                    expected_readings=stats.committed + len(own_ids))
    p50, p99, worst = check_normal(found)
    assert await wait_for(lambda: _gauge_is(worker, 0), timeout=12)
    report(scenario="12. open writer + idle in transaction (ours)", runs=1,
           readings=outcome.tally.readings, lost=outcome.lost, duplicated=outcome.duplicated,
           recovery=(f"its 25 readings scored {own_delay * 1000:.0f} ms after its commit; "
                     f"stream meanwhile p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
                     f"max {worst * 1000:.0f} ms"),
           detail=(f"sensor_open_reading_transactions={waiting:g}, oldest {age:.1f} s while "
                   "open; 0 after"))


async def _all_predicted(conn: asyncpg.Connection, ids: list[int]) -> bool:
    return bool(await conn.fetchval(
        "SELECT count(*) FROM predictions WHERE reading_id = ANY($1::bigint[])", ids)
        == len(ids))


async def _gauge_is(worker: Any, value: float) -> bool:
    return bool(worker.metric("sensor_open_reading_transactions") == value)


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_write_transaction_open_for_60_s_in_another_database(
        held_60_s: Background[dict[str, Any]] | None, report: Any) -> None:
    """A write transaction open for 60 s in another database of the server: the stream of ours
    is scored at normal latency all along (see held_60_s: it runs beside the tests before)."""
    assert held_60_s is not None
    report(**await asyncio.to_thread(held_60_s.result, 200))


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_prepared_transaction_left_for_30_s(
        prepared_30_s: Background[dict[str, Any]] | None, report: Any) -> None:
    """Two-phase commit: a transaction prepared, then neither committed nor rolled back for
    30 s: the stream is scored at normal latency all along, nothing lost or doubled (see
    prepared_30_s: it runs beside the tests above)."""
    assert prepared_30_s is not None
    report(**await asyncio.to_thread(prepared_30_s.result, 200))
