"""What the readings_own_txid trigger (migration 0008) costs writers: plain multi-row INSERTs
and COPY, with the trigger and with it dropped, alternated on one fresh database.

    uv run python -m bench.claims_trigger [--rounds 7]

Prints one JSON object: median ms per statement of each shape, with and without.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid

import asyncpg

from bench.claims_micro import VALUES, _dsn
from sensor_predictor.migrate import migrate

INSERT = ('INSERT INTO readings ("timestamp", "values", machine_id)'
          " SELECT now(), v::jsonb, $2 FROM unnest($1::text[]) AS v")
TRIGGER = ("CREATE TRIGGER readings_own_txid BEFORE INSERT ON readings FOR EACH ROW"
           " WHEN (NEW.txid IS DISTINCT FROM pg_current_xact_id())"
           " EXECUTE FUNCTION sp_readings_own_txid()")


async def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    admin = await asyncpg.connect(**_dsn("postgres"))
    name = f"sp_trigger_{uuid.uuid4().hex[:8]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    out: dict[str, list[float]] = {}
    try:
        conn = await asyncpg.connect(**_dsn(name))
        await migrate(conn)
        machine = await conn.fetchval("INSERT INTO machines (machine_id) VALUES ('t') RETURNING id")
        rows100 = [VALUES] * 100
        for _ in range(args.rounds):
            for with_trigger in (True, False):
                await conn.execute("DROP TRIGGER IF EXISTS readings_own_txid ON readings")
                if with_trigger:
                    await conn.execute(TRIGGER)
                tag = "with" if with_trigger else "without"
                times = []
                for _ in range(50):
                    started = time.perf_counter()
                    await conn.execute(INSERT, rows100, machine)
                    times.append(time.perf_counter() - started)
                out.setdefault(f"insert_100_rows_ms_{tag}", []).append(statistics.median(times))
                started = time.perf_counter()
                await conn.copy_records_to_table(
                    "readings", columns=["values", "machine_id"],
                    records=((VALUES, machine) for _ in range(20_000)))
                out.setdefault(f"copy_20000_rows_ms_{tag}", []).append(
                    time.perf_counter() - started)
        await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()
    result = {k: round(statistics.median(v) * 1000, 3) for k, v in out.items()}
    for shape in ("insert_100_rows_ms", "copy_20000_rows_ms"):
        result[f"{shape}_ratio"] = round(result[f"{shape}_with"] / result[f"{shape}_without"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
