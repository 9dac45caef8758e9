"""Many writers committing out of id order, in bulk; several workers on one database."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest

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
from tests.support.chaos_fixtures import Workers
from tests.support.databases import Database
from tests.support.models import Models

pytestmark = [pytest.mark.asyncio, pytest.mark.chaos]


@dataclass
class TxLog:
    committed: int = 0
    rolled_back: int = 0
    transactions: int = 0
    # (time.monotonic() when COMMIT answered, ids of the transaction)
    commits: list[tuple[float, list[int]]] = field(default_factory=list)


def _rows(rnd: random.Random, n: int) -> list[str]:
    start = rnd.randrange(len(GOOD_ROWS))
    return [GOOD_ROWS[(start + i) % len(GOOD_ROWS)] for i in range(n)]


async def _holding_writer(db: Database, seed: int, stop: asyncio.Event, log: TxLog) -> None:
    """Transactions of 1-4 bulk statements, held open for random durations; some roll back;
    some take ids from the sequence long before they write them (the watermark trap)."""
    rnd = random.Random(seed)
    conn = await db.connect()
    try:
        machine = await machine_id(conn, f"writer-{seed}")
        while not stop.is_set():
            tx = conn.transaction()
            await tx.start()
            ids: list[int] = []
            early: list[int] = []
            if rnd.random() < 0.3:
                early = [r[0] for r in await conn.fetch(
                    "SELECT nextval('readings_id_seq') FROM generate_series(1, $1)",
                    rnd.randint(1, 50))]
            for _ in range(rnd.randint(1, 4)):
                n = rnd.choice([1, 5, 50, 200, 1000])
                ids += [r["id"] for r in await conn.fetch(INSERT, _rows(rnd, n), machine)]
                await asyncio.sleep(rnd.uniform(0, 0.4))  # holding the transaction open
            if early:
                await conn.executemany(
                    'INSERT INTO readings (id, "values", machine_id) VALUES ($1, $2::jsonb, $3)',
                    [(i, v, machine) for i, v in zip(early, _rows(rnd, len(early)), strict=True)])
                ids += early
            if rnd.random() < 0.1:
                await tx.rollback()
                log.rolled_back += len(ids)
            else:
                await tx.commit()
                log.committed += len(ids)
                log.commits.append((time.monotonic(), ids))
            log.transactions += 1
    finally:
        await conn.close()


async def _bulk_copier(db: Database, seed: int, stop: asyncio.Event, log: TxLog) -> None:
    """COPY of 2000-5000 rows at a time, inside a transaction held open a little."""
    rnd = random.Random(seed)
    conn = await db.connect()
    try:
        machine = await machine_id(conn, f"copier-{seed}")
        while not stop.is_set():
            n = rnd.randint(2000, 5000)
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "readings", records=[(v, machine) for v in _rows(rnd, n)],
                    columns=("values", "machine_id"))
                ids = [r[0] for r in await conn.fetch(
                    "SELECT id FROM readings WHERE txid = pg_current_xact_id()")]
                await asyncio.sleep(rnd.uniform(0, 0.8))
            assert len(ids) == n
            log.committed += n
            log.commits.append((time.monotonic(), ids))
            log.transactions += 1
            await asyncio.sleep(rnd.uniform(0, 0.5))
    finally:
        await conn.close()


def _out_of_order(logs: list[TxLog]) -> int:
    """Readings committed after a reading with a higher id had already been committed."""
    commits = sorted((c for log in logs for c in log.commits), key=lambda c: c[0])
    highest = 0
    late = 0
    for _, ids in commits:
        late += sum(1 for i in ids if i < highest)
        highest = max(highest, max(ids, default=0))
    return late


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_concurrent_writers_committing_out_of_id_order_in_bulk(
        chaos_db: Database, chaos_conn: asyncpg.Connection, chaos_models: Models,
        workers: Workers, report: Any) -> None:
    conn = chaos_conn
    await activate_model(conn, *chaos_models.v1)
    ws = [workers.start(PREDICTION_BATCH_SIZE="200") for _ in range(2)]
    for w in ws:
        await asyncio.to_thread(w.wait_ready)
    stop = asyncio.Event()
    logs = [TxLog() for _ in range(8)]
    tasks = [asyncio.create_task(_holding_writer(chaos_db, seed, stop, logs[seed]))
             for seed in range(6)]
    tasks += [asyncio.create_task(_bulk_copier(chaos_db, 100 + k, stop, logs[6 + k]))
              for k in range(2)]
    await asyncio.sleep(8)
    stop.set()
    await asyncio.gather(*tasks)
    finished = time.monotonic()
    assert await wait_settled(conn, 60), ws[0].logs()[-3000:]
    settle = time.monotonic() - finished
    committed = sum(log.committed for log in logs)
    outcome = await check_invariant(conn, served(chaos_models.v1),
                                    expected_readings=committed)
    late = _out_of_order(logs)
    assert late > 0, "no reading was committed out of id order: the scenario proved nothing"
    report(scenario="4. concurrent writers, out of id order, bulk", runs=1,
           readings=outcome.tally.readings, lost=outcome.lost, duplicated=outcome.duplicated,
           recovery=f"backlog 0 {settle:.2f} s after the last commit",
           detail=(f"{sum(log.transactions for log in logs)} transactions by 8 writers (6 "
                   f"holding 1-4 statements open 0-1.6 s, 2 COPYing 2-5k rows), "
                   f"{sum(log.rolled_back for log in logs)} rows rolled back, {late} readings "
                   "committed after a higher id; 2 workers"))


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_four_workers_on_one_database(
        chaos_db: Database, chaos_conn: asyncpg.Connection, chaos_models: Models,
        workers: Workers, report: Any) -> None:
    """Four workers, all ready (model loaded), while a stream goes on; then a 60,000-row bulk
    load commits at once (one transaction, COPY): they drain it together."""
    conn = chaos_conn
    await activate_model(conn, *chaos_models.v1)
    ws = [workers.start(PREDICTION_BATCH_SIZE="500") for _ in range(4)]
    for w in ws:
        await asyncio.to_thread(w.wait_ready)
    backlog = 60_000
    machine = await machine_id(conn)
    async with StreamWriter(chaos_db.server, chaos_db.name, rows=50, pause=0.05) as writer:
        await asyncio.sleep(0.5)
        async with conn.transaction():
            for start in range(0, backlog, 5000):
                await conn.copy_records_to_table(
                    "readings", records=[(GOOD_ROWS[(start + i) % len(GOOD_ROWS)], machine)
                                         for i in range(5000)], columns=("values", "machine_id"))
        committed = time.monotonic()
        first = await conn.fetchval("SELECT max(id) FROM predictions") or 0
        assert await wait_settled(conn, 180), ws[0].logs()[-3000:]
        drained = time.monotonic() - committed
        stats = await writer.stop()
    assert await wait_settled(conn, 30)
    outcome = await check_invariant(conn, served(chaos_models.v1),
                                    expected_readings=backlog + stats.committed)
    counts = [await asyncio.to_thread(w.metric, "sensor_predictions_total") or 0 for w in ws]
    assert sum(counts) == outcome.tally.predicted, counts
    span = await conn.fetchval(
        "SELECT extract(epoch FROM max(prediction_time) - min(prediction_time))"
        " FROM predictions WHERE id > $1", first)
    report(scenario="5. four workers, one database", runs=1, readings=outcome.tally.readings,
           lost=outcome.lost, duplicated=outcome.duplicated,
           recovery=f"{backlog:,} rows committed at once drained in {drained:.2f} s",
           detail=(f"throughput {backlog / drained:,.0f} readings/s commit to backlog 0 "
                   f"({backlog / max(float(span or 0), 1e-3):,.0f}/s first to last prediction "
                   f"of the bulk); per worker (whole test) {[int(c) for c in counts]}"))
    # All four took part: every ready worker is woken by the commit's notification.
    assert all(c > 0 for c in counts), counts
