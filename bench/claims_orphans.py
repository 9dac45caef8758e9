"""The orphan look under a long transaction: claims churn while a REPEATABLE READ session stays
open, so none of the deleted claim rows can be vacuumed away.

    uv run python -m bench.claims_orphans [--seconds 60] [--rate 1000]

Every few seconds, on a fresh database of the server PGHOST/PGPORT name: the full look
(sp_take_orphan over every claim, what 0003 did on every look) against the orphan timer's look
(sp_orphans over the claims above its mark and those it saw alive) and a takeover of named
candidates. Prints one JSON object: the dead rows kept and the median ms of each look.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from typing import Any

import asyncpg

from bench.claims_micro import VALUES, _dsn
from sensor_predictor import db
from sensor_predictor.migrate import migrate


async def _ms(conn: asyncpg.Connection, sql: str, *args: Any, n: int = 9) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        await conn.fetch(sql, *args)
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 3)


async def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--rate", type=float, default=1000, help="claims per second at most")
    p.add_argument("--every", type=float, default=10)
    args = p.parse_args(argv)
    q = db.queries()
    admin = await asyncpg.connect(**_dsn("postgres"))
    name = f"sp_orphans_{uuid.uuid4().hex[:8]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    points: list[dict[str, Any]] = []
    try:
        conn = await asyncpg.connect(**_dsn(name))
        await migrate(conn)
        machine = await conn.fetchval("INSERT INTO machines (machine_id) VALUES ('o') RETURNING id")
        holder = await asyncpg.connect(**_dsn(name))  # the long transaction
        tx = holder.transaction(isolation="repeatable_read")
        await tx.start()
        await holder.fetchval("SELECT count(*) FROM scoring_claims")
        churn = await asyncpg.connect(**_dsn(name))
        await churn.execute("SET synchronous_commit = off")
        # One claim that stays alive, owned by a session that lives (the timer keeps it known).
        live = await asyncpg.connect(**_dsn(name))
        await live.execute('INSERT INTO readings ("values", machine_id) VALUES ($1::jsonb, $2)',
                           VALUES, machine)
        alive = await live.fetchrow(q["claim"], "alive", 1, None, None)
        looker = await asyncpg.connect(**_dsn(name))
        started = time.perf_counter()
        next_point = 0.0
        claims = 0
        held = None
        while (elapsed := time.perf_counter() - started) < args.seconds:
            if elapsed >= next_point:
                top = int(await looker.fetchval("SELECT last_value FROM scoring_claims_id_seq"))
                points.append({
                    "t_s": round(elapsed, 1), "claims_churned": claims,
                    "full_look_ms": await _ms(looker, "SELECT * FROM sp_take_orphan('l', 60)"),
                    "timer_look_ms": await _ms(looker, q["find_orphans"], top,
                                               [alive["claim_id"]], 60.0),
                    "take_candidates_ms": await _ms(looker, q["take_orphan"], "l", 60.0, None,
                                                    None, [alive["claim_id"]]),
                    "backlog_ms": await _ms(looker, q["backlog"], n=3),
                })
                print(json.dumps(points[-1]), flush=True)
                next_point += args.every
            await churn.execute(
                'INSERT INTO readings ("values", machine_id) VALUES ($1::jsonb, $2)',
                VALUES, machine)
            row = await churn.fetchrow(q["claim"], "churn", 1, None, held)
            if row is not None and row["claim_id"] is not None:
                ids = list(row["reading_ids"])
                await churn.fetchval(q["write_claim"], row["claim_id"], ids, [0], [1.0], "1",
                                     "r", "m", [], [], [], [0], 0)
                held = row["claim_id"]
                claims += 1
            behind = claims / args.rate - (time.perf_counter() - started)
            if behind > 0:
                await asyncio.sleep(behind)
        dead = await looker.fetchval(
            "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'scoring_claims'")
        await tx.rollback()
        for c in (conn, holder, churn, live, looker):
            await c.close()
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()
    print(json.dumps({"claims_per_s": round(claims / args.seconds), "dead_rows_stat": dead,
                      "points": points}))


if __name__ == "__main__":
    asyncio.run(main())
