"""`widen-ids` on 1,000,000 adopted readings with their predictions, under writers: how long it
takes and the longest stall any writer sees.

    uv run python -m bench.widen_ids [--readings 1000000] [--out bench/results/widen_ids]

A database the old system made and filled (its schema, 1M readings, the old predictor's
predictions for 60 % of those without a failure), adopted by our `migrate`. Two writers run
throughout, each timing every transaction: the old consumer (one message per transaction, its
own statements) and a prediction writer shaped like the worker's result statement (a batch of
predictions for the consumer's new readings, INSERT ... ON CONFLICT DO NOTHING). A writer's
stall is its longest transaction during the widening (their usual length is milliseconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from sensor_predictor.devtools import old_system
from sensor_predictor.devtools.postgres import (
    PgServer,
    create_database,
    drop_database,
    find_or_start,
)
from sensor_predictor.migrate import migrate
from sensor_predictor.widen_ids import widen_ids


@dataclass
class Timed:
    name: str
    durations: list[tuple[float, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def longest(self, since: float, until: float) -> float:
        return max((d for s, d in self.durations if since <= s <= until), default=0.0)

    def count(self, since: float, until: float) -> int:
        return sum(1 for s, _ in self.durations if since <= s <= until)

    def p99(self, since: float, until: float) -> float:
        ds = sorted(d for s, d in self.durations if since <= s <= until)
        return ds[int(0.99 * (len(ds) - 1))] if ds else 0.0


async def consumer(conn: asyncpg.Connection, t: Timed, stop: asyncio.Event,
                   written: list[int]) -> None:
    c = old_system.Consumer(conn)
    rnd = random.Random(5)
    while not stop.is_set():
        started = time.monotonic()
        try:
            written.append(await c.write(f"machine-{rnd.randrange(10)}", old_system.message(rnd),
                                         has_failure=False))
        except asyncpg.PostgresError as exc:
            t.errors.append(f"{type(exc).__name__}: {exc}")
        t.durations.append((started, time.monotonic() - started))
        await asyncio.sleep(0.002)


async def predictor(conn: asyncpg.Connection, t: Timed, stop: asyncio.Event,
                    written: list[int]) -> None:
    done = 0
    while not stop.is_set():
        ids = written[done:done + 50]
        if not ids:
            await asyncio.sleep(0.01)
            continue
        started = time.monotonic()
        try:
            await conn.execute(
                "INSERT INTO predictions (cluster_id, model_version, reading_id, prediction_time,"
                " model_name, mlflow_run_id)"
                " SELECT 1, 'bench', r, now(), 'sensor_failure_clustering', 'bench'"
                "   FROM unnest($1::bigint[]) r ON CONFLICT (reading_id, model_version) DO NOTHING",
                ids)
            done += len(ids)
        except asyncpg.PostgresError as exc:
            t.errors.append(f"{type(exc).__name__}: {exc}")
        t.durations.append((started, time.monotonic() - started))
        await asyncio.sleep(0.01)


async def main(server: PgServer, readings: int, out: Path, batch_size: int
               ) -> dict[str, object]:
    name = f"sp_widen_bench_{uuid.uuid4().hex[:8]}"
    await create_database(server, name)
    try:
        conn = await server.connect(name)
        t0 = time.monotonic()
        await old_system.create_old_schema(conn)
        await old_system.bulk_history(conn, readings, machines=10)
        n_pred = await old_system.old_predictions(conn, "1", "old-run-1", share=0.6)
        await migrate(conn)
        await conn.execute("VACUUM ANALYZE readings, predictions")
        built = time.monotonic() - t0
        sizes = dict(await conn.fetchrow(
            "SELECT pg_size_pretty(pg_total_relation_size('readings')) AS readings,"
            "       pg_size_pretty(pg_total_relation_size('predictions')) AS predictions"))

        stop = asyncio.Event()
        written: list[int] = []
        cons, pred = Timed("old consumer"), Timed("prediction writer")
        wconn, pconn = await server.connect(name), await server.connect(name)
        tasks = [asyncio.create_task(consumer(wconn, cons, stop, written)),
                 asyncio.create_task(predictor(pconn, pred, stop, written))]
        await asyncio.sleep(2.0)
        started = time.monotonic()
        report = await widen_ids(conn, batch_size=batch_size)
        ended = time.monotonic()
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*tasks)
        types = [dict(r) for r in await conn.fetch(
            "SELECT c.relname AS tbl, a.attname AS col, format_type(a.atttypid, NULL) AS type"
            "  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
            " WHERE c.relname IN ('readings', 'predictions')"
            "   AND a.attname IN ('id', 'reading_id')"
            " ORDER BY 1, 2")]
        counts = dict(await conn.fetchrow(
            "SELECT (SELECT count(*) FROM readings) AS readings,"
            "       (SELECT count(*) FROM predictions) AS predictions"))
        for c in (conn, wconn, pconn):
            await c.close()
    finally:
        await drop_database(server, name)
    result: dict[str, object] = {
        "readings": readings, "old_predictions": n_pred, "table_sizes": sizes,
        "setup_seconds": round(built, 1), "batch_size": batch_size,
        "widen_seconds": round(ended - started, 1),
        "rows_backfilled": report.backfilled_rows,
        "longest_locking_transaction_s": round(report.longest_lock_seconds, 3),
        "lock_retries": report.lock_retries,
        "writers": {t.name: {"transactions_during": t.count(started, ended),
                             "longest_stall_ms": round(1000 * t.longest(started, ended), 1),
                             "p99_ms": round(1000 * t.p99(started, ended), 1),
                             "errors": t.errors[:5], "error_count": len(t.errors)}
                    for t in (cons, pred)},
        "types_after": types, "rows_after": counts, "steps": report.steps,
        "machine": f"{platform.machine()}, {platform.python_version()}, shared 2 cores",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--readings", type=int, default=1_000_000)
    p.add_argument("--batch-size", type=int, default=20_000)
    p.add_argument("--out", type=Path, default=Path("bench/results/widen_ids"))
    a = p.parse_args()
    print(json.dumps(asyncio.run(main(find_or_start({"fsync": "off"}), a.readings, a.out,
                                               a.batch_size)), indent=2))
