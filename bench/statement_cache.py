"""What transaction mode's `statement_cache_size=0` costs per batch: the claim protocol's steady
round (10 new readings: claim + read, write, the empty claim that ends the pass; the worker's own
statements, no model) with asyncpg's statement cache on and off, directly and through a
PgBouncer in transaction mode started here. Medians of --rounds x --batches, interleaved.

    uv run python -m bench.statement_cache [--batches 400] [--rounds 3]

Against the server PGHOST/PGPORT name (default 127.0.0.1:5432), on a fresh database migrated by
the code imported. Prints one JSON object (milliseconds per round).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import uuid
from typing import Any

import asyncpg

from bench import claims_micro as micro
from sensor_predictor.devtools.pgbouncer import start_pgbouncer
from sensor_predictor.devtools.postgres import PgServer
from sensor_predictor.migrate import migrate


async def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, default=400)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    dsn = micro._dsn("postgres")
    admin = await asyncpg.connect(**dsn)
    name = f"sp_cache_{uuid.uuid4().hex[:8]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    bouncer = await asyncio.to_thread(
        start_pgbouncer, PgServer(dsn["host"], dsn["port"], dsn["user"]), "transaction", 2,
        (dsn["user"],))
    routes: dict[str, dict[str, Any]] = {
        "direct_cache_on": {"statement_cache_size": 100},
        "direct_cache_off": {"statement_cache_size": 0},
        "pgbouncer_transaction_cache_off": {"statement_cache_size": 0, "host": bouncer.host,
                                            "port": bouncer.port},
    }
    out: dict[str, list[float]] = {k: [] for k in routes}
    try:
        conn = await asyncpg.connect(**micro._dsn(name))
        await migrate(conn)
        await conn.execute("INSERT INTO machines (machine_id) VALUES ('b')")
        await conn.close()
        path = micro.Path()
        for _ in range(args.rounds):
            for route, kwargs in routes.items():
                c = await asyncpg.connect(**{**micro._dsn(name), **kwargs})
                await c.set_type_codec("jsonb", encoder=str, decoder=str, schema="pg_catalog")
                out[route].append(await micro.steady(path, c, args.batches))
                await c.close()
    finally:
        bouncer.stop()
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()
    print(json.dumps({"ms_per_round": {k: round(statistics.median(v), 3)
                                       for k, v in out.items()},
                      "all": {k: [round(x, 3) for x in v] for k, v in out.items()}}))


if __name__ == "__main__":
    asyncio.run(main())
