"""The hot path of a caught-up stream (issue 22): what a wake-up costs the server, and the
latency trace an operator can turn on to see where a reading's time goes."""

from __future__ import annotations

import asyncio
import json

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

WAKE_UPS = 8


async def _all_scored(conn: asyncpg.Connection) -> bool:
    t = await tally(conn)
    return t.readings > 0 and t.missing == 0


async def _trickle(conn: asyncpg.Connection) -> None:
    """WAKE_UPS single-statement writes, each scored before the next: a caught-up stream."""
    for i in range(WAKE_UPS):
        await insert_readings(conn, [reading(10 * i + j) for j in range(5)])
        assert await wait_for(lambda: _all_scored(conn), timeout=5, interval=0.005)
        await asyncio.sleep(0.1)


async def test_a_caught_up_wake_up_costs_one_claim(
        database: Database, conn: asyncpg.Connection, models: Models,
        worker_factory: WorkerFactory) -> None:
    # The server counts the claim function's calls (pg_stat_user_functions) for the worker's
    # sessions; a session sends its counts when it ends, at the latest.
    await conn.execute(f'ALTER DATABASE "{database.name}" SET track_functions = \'pl\'')
    run_id, version = models.v1
    await activate_model(conn, run_id, version)
    worker = worker_factory(INFERENCE_INTERVAL_SECONDS="30", PREDICTION_CONCURRENCY="2").start()
    await worker.until_ready()

    await _trickle(conn)
    await worker.astop()

    calls = int(await conn.fetchval(
        "SELECT COALESCE(sum(calls), 0) FROM pg_stat_user_functions"
        " WHERE funcname = 'sp_claim_next'"))
    # Per wake-up, one claim on the reading's path: it finds the statement's readings (fewer
    # than a batch: the cursor's interval is handed out), and a second lane joins only when the
    # stream is behind (or a wake-up comes during the pass). Then, off the path, the doorbell's
    # look after its grant (one claim that finds nothing) before the worker sleeps armed. The
    # start-up's passes add a few. Both lanes claiming, and each lane claiming again until it
    # found nothing, made it 3 per wake-up without the doorbell (26 here), 4 with it.
    assert calls <= 2 * WAKE_UPS + 4, calls


async def test_latency_trace_gives_each_batch_its_steps_in_order(
        conn: asyncpg.Connection, models: Models, worker_factory: WorkerFactory) -> None:
    run_id, version = models.v1
    await activate_model(conn, run_id, version)
    worker = worker_factory(INFERENCE_INTERVAL_SECONDS="30",
                            SENSOR_PREDICTOR_LATENCY_TRACE="1").start()
    await worker.until_ready()
    await _trickle(conn)

    traces = [json.loads(line) for line in worker.logs().splitlines()
              if '"latency_trace"' in line]
    notified = [t for t in traces if t["notified"] is not None]
    assert len(notified) >= WAKE_UPS - 1, traces  # one batch per write (one may be a poll's)
    steps = ["notified", "pass_start", "claim_sent", "claim_back", "write_sent", "committed"]
    for t in notified:
        times = [t[k] for k in steps]
        assert times == sorted(times), t
        assert t["committed"] - t["notified"] < 2.0, t
        assert t["rows"] == 5
