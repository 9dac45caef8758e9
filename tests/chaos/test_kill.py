"""Worker processes killed (SIGKILL) and stopped (SIGTERM) in the middle of a stream."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import statistics
import time
from collections import Counter
from typing import Any

import asyncpg
import pytest

from sensor_predictor.devtools.worker_process import WorkerProcess
from sensor_predictor.training import activate_model
from tests.support.chaos import (
    GOOD_ROWS,
    INSERT,
    StreamWriter,
    check_invariant,
    machine_id,
    percentile,
    served,
    unscored,
    wait_settled,
)
from tests.support.chaos_fixtures import Workers
from tests.support.databases import Database
from tests.support.models import Models
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.asyncio, pytest.mark.chaos]

# Each kill costs a worker start (~5-20 s on our shared 2-core machine, mostly imports and the
# model's load): 6 kills keep the suite within its 10 minutes; CHAOS_KILLS=20 (or more) for a
# long soak.
KILLS = int(os.environ.get("CHAOS_KILLS", "6"))

BURST = [GOOD_ROWS[i % len(GOOD_ROWS)] for i in range(20_000)]


async def _results_per_reading(conn: asyncpg.Connection) -> dict[int, int]:
    rows = await conn.fetch("""
        SELECT r.id, (SELECT count(*) FROM predictions p WHERE p.reading_id = r.id)
                   + (SELECT count(*) FROM reading_errors e WHERE e.reading_id = r.id) AS n
          FROM readings r""")
    return {r["id"]: r["n"] for r in rows}


async def _wait_recovered(conn: asyncpg.Connection, worker: WorkerProcess, mark: int,
                          above: int, restarted: float, timeout: float = 120  # noqa: ASYNC109
                          ) -> tuple[float, float | None]:
    """Seconds from the restart until every reading committed before it has a result (and until
    the worker said ready, when it did so first)."""
    ready_at: float | None = None
    deadline = restarted + timeout
    while time.monotonic() < deadline:
        if ready_at is None:
            state = await asyncio.to_thread(worker.ready)
            if state and state.get("ready"):
                ready_at = time.monotonic() - restarted
        if await unscored(conn, up_to=mark, above=above) == 0:
            return time.monotonic() - restarted, ready_at
        assert worker.proc is not None and worker.proc.poll() is None, worker.logs()[-3000:]
        await asyncio.sleep(0.02)
    raise AssertionError(f"not recovered {timeout} s after the restart:\n{worker.logs()[-3000:]}")


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_sigkill_at_random_moments_of_a_stream(
        chaos_db: Database, chaos_conn: asyncpg.Connection, chaos_models: Models,
        workers: Workers, report: Any) -> None:
    conn = chaos_conn
    await activate_model(conn, *chaos_models.v1)
    # CLAIM_ORPHAN_SECONDS stays at its default (60 s, the half-open fallback): a killed
    # worker's claims are taken over because its session ended.
    env = {"PREDICTION_BATCH_SIZE": "50"}
    writer = StreamWriter(chaos_db.server, chaos_db.name, rows=20, pause=0.02).start()
    rnd = random.Random(20)
    worker = workers.start(**env)
    await asyncio.to_thread(worker.wait_ready)
    cycles: list[dict[str, Any]] = []
    recovered_up_to = 0
    for k in range(KILLS):
        await asyncio.sleep(rnd.uniform(0.05, 1.5))
        worker.signal(signal.SIGKILL)
        await asyncio.to_thread(worker.wait, 10)
        orphaned = await conn.fetch("SELECT id FROM scoring_claims")
        restarted = time.monotonic()
        mark = writer.stats.max_id  # everything committed before the restart
        worker = workers.start(**env)
        recovery, ready = await _wait_recovered(conn, worker, mark, recovered_up_to, restarted)
        cycles.append({"kill": k + 1, "from_id": recovered_up_to, "to_id": mark,
                       "orphaned_claims": len(orphaned), "recovery_s": recovery,
                       "ready_s": ready})
        recovered_up_to = mark
    stats = await writer.stop()
    assert await wait_settled(conn, 60), worker.logs()[-3000:]
    outcome = await check_invariant(conn, served(chaos_models.v1),
                                    expected_readings=stats.committed)

    per_reading = await _results_per_reading(conn)
    for c in cycles:
        counts = Counter(n for rid, n in per_reading.items() if c["from_id"] < rid <= c["to_id"])
        c["readings"] = sum(counts.values())
        c["lost"] = counts.get(0, 0)
        c["duplicated"] = sum(v for n, v in counts.items() if n > 1)
        assert c["lost"] == 0 and c["duplicated"] == 0, c
    recoveries = [c["recovery_s"] for c in cycles]
    readies = [c["ready_s"] for c in cycles if c["ready_s"] is not None]
    after_ready = [c["recovery_s"] - c["ready_s"] for c in cycles if c["ready_s"] is not None]
    mid_batch = sum(1 for c in cycles if c["orphaned_claims"])
    report(scenario="1. SIGKILL x random moments + restart", runs=f"{KILLS} kills",
           readings=outcome.tally.readings, lost=outcome.lost, duplicated=outcome.duplicated,
           recovery=(f"restart->backlog 0: median {statistics.median(recoveries):.2f} s, "
                     f"p95 {percentile(recoveries, 0.95):.2f} s, max {max(recoveries):.2f} s"),
           detail=(f"{mid_batch}/{KILLS} kills left claims (killed mid-batch), "
                   f"{sum(c['orphaned_claims'] for c in cycles)} orphaned claims re-taken; "
                   f"restart->ready median {statistics.median(readies):.2f} s, ready->backlog 0 "
                   f"median {statistics.median(after_ready):.2f} s; "
                   f"stream {stats.committed} rows; per kill (readings, recovery s): "
                   + ", ".join(f"{c['readings']}/{c['recovery_s']:.1f}" for c in cycles)))


async def _claims_in_flight(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("SELECT count(*) FROM scoring_claims"))


async def _start_ready(workers: Workers, **env: str) -> WorkerProcess:
    worker = workers.start(**env)
    await asyncio.to_thread(worker.wait_ready)
    return worker


@pytest.mark.slow
async def test_sigterm_under_load_commits_in_flight_batches_and_exits_zero(
        chaos_db: Database, chaos_conn: asyncpg.Connection, chaos_models: Models,
        workers: Workers, report: Any) -> None:
    conn = chaos_conn
    await activate_model(conn, *chaos_models.v1)
    # A backlog, so the worker is busy scoring when the signal comes, and a stream on top.
    env = {"PREDICTION_BATCH_SIZE": "500", "PREDICTION_CONCURRENCY": "2", "LOG_LEVEL": "debug"}
    writer = StreamWriter(chaos_db.server, chaos_db.name, rows=100, pause=0.01).start()
    rnd = random.Random(8)
    exits: list[float] = []
    finished_after_signal: list[int] = []
    burst_rows = 0
    machine = await machine_id(conn, "burst")
    runs = 3
    for _ in range(runs):
        worker = await _start_ready(workers, **env)
        await asyncio.sleep(rnd.uniform(0.3, 1.5))
        # The backlog: a 20,000-row statement on top of the stream (the restart gaps alone leave
        # almost none now that a restart serves its model from the cache), and the signal as
        # soon as a batch is in flight: its claim row exists from the claim to the commit of
        # its results (the worker drains the burst in well under 100 ms here: a signal at a
        # random moment, or one after a scrape of /metrics, found it idle).
        burst_rows += len(await conn.fetch(INSERT, BURST, machine))
        busy = await wait_for(lambda: _claims_in_flight(conn), timeout=10, interval=0.001)
        worker.signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = await asyncio.to_thread(worker.wait, 10)
        exits.append(time.monotonic() - signalled)
        assert code == 0, worker.logs()[-3000:]
        assert exits[-1] < 5, exits
        # Every range it had claimed was committed: no claim is left for an orphan hunt.
        assert await conn.fetchval("SELECT count(*) FROM scoring_claims") == 0
        assert busy, "no batch was in flight before the signal: no load"
        events = [e.get("event") for e in worker.events()]
        assert "shutdown_requested" in events and "worker_stopped" in events
        assert "batch_failed" not in events, worker.logs()[-3000:]
        after = events[events.index("shutdown_requested"):]
        finished_after_signal.append(after.count("batch_scored"))
    stats = await writer.stop()
    final = await _start_ready(workers, **env)
    assert await wait_settled(conn, 60), final.logs()[-3000:]
    outcome = await check_invariant(conn, served(chaos_models.v1),
                                    expected_readings=stats.committed + burst_rows)
    report(scenario="8. SIGTERM under load", runs=runs, readings=outcome.tally.readings,
           lost=outcome.lost, duplicated=outcome.duplicated,
           recovery=f"exit 0 in {min(exits):.2f}-{max(exits):.2f} s after SIGTERM",
           detail=(f"batches committed after SIGTERM per run: {finished_after_signal}; no "
                   "claim left after any exit"))
    # At least one signal came in the middle of a batch, and that batch was committed.
    assert max(finished_after_signal) >= 1, finished_after_signal
