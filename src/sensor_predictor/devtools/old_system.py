"""The old system, as far as its database sees it: the schema its ORM creates
(old_system_schema.sql, a pg_dump of it) and the statements its consumer and its predictor send.
For the compatibility tests, the adoption bench and anyone trying an adoption by hand."""

from __future__ import annotations

import datetime as dt
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

SCHEMA_SQL = Path(__file__).with_name("old_system_schema.sql")
SENSORS = [f"Sensor {i}" for i in range(1, 21)]
MODEL_NAME = "sensor_failure_clustering"


async def create_old_schema(conn: asyncpg.Connection) -> None:
    """The tables exactly as the old consumer's ORM leaves them (no defaults, integer ids)."""
    await conn.execute(SCHEMA_SQL.read_text(encoding="utf-8"))


# -- the old consumer --------------------------------------------------------------------------


def message(rnd: random.Random, shift: float = 0.0) -> dict[str, float]:
    """The 20 sensors of one message, "Sensor 1".."Sensor 20"."""
    return {s: round(rnd.gauss(shift + (i % 5) * 0.3, 1.0), 5) for i, s in enumerate(SENSORS)}


@dataclass
class Consumer:
    """Writes readings the way the old consumer does: one transaction per message (machine
    select + insert or last_seen update, the failure episode opened or closed when the
    message's has_failure flag changes, then a single-row INSERT ... RETURNING "id")."""

    conn: asyncpg.Connection
    failing: dict[str, bool] = field(default_factory=dict)

    async def write(self, machine: str, values: dict[str, float], has_failure: bool,
                    when: dt.datetime | None = None) -> int:
        now = when or dt.datetime.now(dt.UTC)
        c = self.conn
        async with c.transaction():
            row = await c.fetchrow(
                'SELECT "id" FROM "machines" WHERE "machine_id"=$1 LIMIT 2', machine)
            if row is None:
                machine_pk = await c.fetchval(
                    'INSERT INTO "machines" ("machine_id","first_seen","last_seen")'
                    ' VALUES ($1,$2,$3) RETURNING "id"', machine, now, now)
            else:
                machine_pk = row["id"]
                await c.execute('UPDATE "machines" SET "last_seen"=$1 WHERE "id"=$2',
                                now, machine_pk)
            failure_id = await c.fetchval(
                'SELECT "id" FROM "failures" WHERE "machine_id"=$1 AND "is_active" LIMIT 1',
                machine_pk)
            if has_failure and failure_id is None:
                failure_id = await c.fetchval(
                    'INSERT INTO "failures" ("start_time","end_time","is_active","machine_id")'
                    ' VALUES ($1,NULL,true,$2) RETURNING "id"', now, machine_pk)
            elif not has_failure and failure_id is not None:
                await c.execute(
                    'UPDATE "failures" SET "end_time"=$1,"is_active"=false WHERE "id"=$2',
                    now, failure_id)
                failure_id = None
            reading_id: int = await c.fetchval(
                'INSERT INTO "readings" ("timestamp","values","machine_id","failure_id")'
                ' VALUES ($1,$2,$3,$4) RETURNING "id"',
                now, json.dumps(values), machine_pk, failure_id)
        return reading_id


async def bulk_history(conn: asyncpg.Connection, readings: int, machines: int = 10,
                       failure_share: float = 0.1, seed: int = 0) -> None:
    """Months of the old consumer's history, written fast (one INSERT ... SELECT), in its
    shape: machines, closed failure episodes, readings with and without failure_id."""
    await conn.execute(
        "INSERT INTO machines (machine_id, first_seen, last_seen)"
        " SELECT 'machine-' || g, now() - interval '90 days', now()"
        "   FROM generate_series(1, $1) g", machines)
    await conn.execute(
        "INSERT INTO failures (start_time, end_time, is_active, machine_id)"
        " SELECT now() - interval '60 days', now() - interval '59 days', false, m.id"
        "   FROM machines m")
    sensors = ", ".join(
        f"'{s}', round((random() * 2 - 1 + {i % 5} * 0.3)::numeric, 5)"
        for i, s in enumerate(SENSORS))
    await conn.execute(f"""
        SELECT setseed({seed / 1000});
        INSERT INTO readings ("timestamp", "values", machine_id, failure_id)
        SELECT now() - (g || ' seconds')::interval, jsonb_build_object({sensors}),
               m.id, CASE WHEN random() < {failure_share} THEN f.id END
          FROM generate_series(1, {readings}) g
          JOIN machines m ON m.id = 1 + g % {machines}
          JOIN failures f ON f.machine_id = m.id""")


# -- the old predictor ---------------------------------------------------------------------------


async def old_predictions(conn: asyncpg.Connection, version: str, run_id: str,
                          share: float = 0.5) -> int:
    """What the old predictor wrote: one prediction for readings with no failure_id (a share
    of them: it never kept up), model_version the registered version as text."""
    status = await conn.execute("""
        INSERT INTO predictions (cluster_id, model_version, confidence_score, prediction_time,
                                 mlflow_run_id, model_name, reading_id)
        SELECT abs(hashtext(r.id::text)) % 3, $1, NULL, now(), $2, $3, r.id
          FROM readings r
         WHERE r.failure_id IS NULL AND abs(hashtext('p' || r.id::text)) % 1000 < $4
    """, version, run_id, MODEL_NAME, int(share * 1000))
    return int(status.split()[-1])
