"""Readings as the old system's writers insert them: plain multi-row INSERTs."""

from __future__ import annotations

import json
import random

import asyncpg

FEATURES = [f"Sensor {i}" for i in range(1, 21)]

INSERT_READINGS = ('INSERT INTO readings ("timestamp", "values", machine_id)'
                   " SELECT now(), v::jsonb, $2 FROM unnest($1::text[]) AS v RETURNING id")


async def machine_id(conn: asyncpg.Connection, name: str = "m-1") -> int:
    return int(await conn.fetchval(
        "INSERT INTO machines (machine_id) VALUES ($1) ON CONFLICT (machine_id)"
        " DO UPDATE SET last_seen = now() RETURNING id", name))


async def insert_readings(conn: asyncpg.Connection, rows: list[dict[str, object] | str | None],
                          machine: str = "m-1") -> list[int]:
    """One INSERT statement; a str is sent as the jsonb text as it is, None as NULL."""
    machine_pk = await machine_id(conn, machine)
    values = [v if isinstance(v, str) or v is None else json.dumps(v) for v in rows]
    return [r["id"] for r in await conn.fetch(INSERT_READINGS, values, machine_pk)]


def reading(seed: int = 0, **overrides: object) -> dict[str, object]:
    """A good reading (every feature a number in [-1, 1]), with `overrides` on top."""
    rnd = random.Random(seed)
    values: dict[str, object] = {name: round(rnd.uniform(-1, 1), 4) for name in FEATURES}
    values.update(overrides)
    return values
