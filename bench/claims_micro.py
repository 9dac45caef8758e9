"""The claim protocol's hot path in SQL alone, for a before/after comparison of a change to it.

    uv run python -m bench.claims_micro [--rows 200000] [--rounds 3]
    PYTHONPATH=/other/checkout/src uv run python -m bench.claims_micro   # the same, other code

On a fresh database of the server PGHOST/PGPORT name (default 127.0.0.1:5432), migrated by the
code imported: the drain of `--rows` waiting readings by one and by two connections (claim and
read in one round trip, then the write that deletes the claim: the worker's statements, no
model), and the steady round trip (10 new readings, claim + read + write) at 1 ms pauses, with
the claim + read alone (no commit wait: the claim's commit does not wait for the disk).
Medians over `--rounds`. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from typing import Any

import asyncpg

from sensor_predictor import db
from sensor_predictor.migrate import migrate

NAMES = [f"Sensor {i}" for i in range(1, 21)]
VALUES = json.dumps({n: 0.5 for n in NAMES})


def _dsn(database: str) -> dict[str, Any]:
    return {"host": os.environ.get("PGHOST", "127.0.0.1"),
            "port": int(os.environ.get("PGPORT", "5432")),
            "user": os.environ.get("PGUSER", "postgres"), "database": database}


class Path:
    """The claim/read/write statements of the code imported, whatever their signature."""

    def __init__(self) -> None:
        q = db.queries()
        self.claim_read = q["claim_read"]
        self.write = q["write_claim"]
        self.new = "$4" in self.claim_read  # this branch: names as a parameter, lease, release
        self.read_sql = db.read_range_query(NAMES)

    async def one(self, conn: asyncpg.Connection, batch: int, held: list[int],
                  claim_times: list[float] | None = None) -> int:
        started = time.perf_counter()
        if self.new:
            rows = await conn.fetch(self.claim_read, "bench", batch, self.read_sql, NAMES,
                                    None, held[0] if held else None)
        else:
            rows = await conn.fetch(self.claim_read, "bench", batch, self.read_sql)
        if claim_times is not None and rows:
            claim_times.append(time.perf_counter() - started)
        if not rows:
            return 0
        claim = rows[0]["claim_id"]
        if claim is None:
            return -1
        ids = [r["id"] for r in rows]
        n = len(ids)
        args: list[Any] = [claim, ids, [0] * n, [1.0] * n, "1", "run", "m", [], [], [],
                           [0] * n]
        if "$12" in self.write:
            args.append(0)
        await conn.fetchval(self.write, *args)
        held[:] = [claim]
        return n


async def _fill(conn: asyncpg.Connection, n: int) -> None:
    machine = await conn.fetchval(
        "INSERT INTO machines (machine_id) VALUES ('b') ON CONFLICT (machine_id)"
        " DO UPDATE SET last_seen = now() RETURNING id")
    await conn.copy_records_to_table(
        "readings", columns=["values", "machine_id"],
        records=((VALUES, machine) for _ in range(n)))


async def drain(path: Path, database: str, lanes: int, batch: int) -> float:
    conns = [await asyncpg.connect(**_dsn(database)) for _ in range(lanes)]
    for c in conns:
        await c.set_type_codec("jsonb", encoder=str, decoder=str, schema="pg_catalog")
    total = 0

    async def lane(c: asyncpg.Connection) -> None:
        nonlocal total
        held: list[int] = []
        while (got := await path.one(c, batch, held)) != 0:
            total += max(got, 0)

    started = time.perf_counter()
    await asyncio.gather(*(lane(c) for c in conns))
    took = time.perf_counter() - started
    for c in conns:
        await c.close()
    return total / took


async def steady(path: Path, conn: asyncpg.Connection, n: int) -> tuple[float, float]:
    """Median ms of the whole round (claim + read + write) and of the claim + read alone."""
    machine = await conn.fetchval("SELECT id FROM machines LIMIT 1")
    times = []
    claim_times: list[float] = []
    held: list[int] = []
    for _ in range(n):
        await conn.execute(
            'INSERT INTO readings ("values", machine_id) SELECT $1::jsonb, $2'
            " FROM generate_series(1, 10)", VALUES, machine)
        started = time.perf_counter()
        while await path.one(conn, 100, held, claim_times) > 0:
            pass
        times.append(time.perf_counter() - started)
        await asyncio.sleep(0.001)
    return statistics.median(times) * 1000, statistics.median(claim_times) * 1000


async def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steady", type=int, default=1000)
    args = p.parse_args(argv)
    path = Path()
    out: dict[str, list[float]] = {"drain_1x1000": [], "drain_2x1000": [], "steady_ms": [],
                                   "steady_claim_read_ms": []}
    admin = await asyncpg.connect(**_dsn("postgres"))
    for _ in range(args.rounds):
        name = f"sp_micro_{uuid.uuid4().hex[:8]}"
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            conn = await asyncpg.connect(**_dsn(name))
            await migrate(conn)
            for lanes, key in ((1, "drain_1x1000"), (2, "drain_2x1000")):
                await _fill(conn, args.rows)
                await conn.execute("VACUUM ANALYZE readings")
                out[key].append(await drain(path, name, lanes, 1000))
            whole, claim_only = await steady(path, conn, args.steady)
            out["steady_ms"].append(whole)
            out["steady_claim_read_ms"].append(claim_only)
            await conn.close()
        finally:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    await admin.close()
    print(json.dumps({"new_path": path.new, **{k: round(statistics.median(v), 3)
                                               for k, v in out.items()},
                      "all": {k: [round(x, 3) for x in v] for k, v in out.items()}}))


if __name__ == "__main__":
    asyncio.run(main())
