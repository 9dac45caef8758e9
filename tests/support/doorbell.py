"""The doorbell as a test sees it (migrations/0013_doorbell.sql): is a worker asleep, armed?"""

from __future__ import annotations

import asyncpg

from sensor_predictor.doorbell import BELL_CLASS, BELL_KEY

HELD = ("SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
        " WHERE l.locktype = 'advisory' AND d.datname = current_database() AND l.granted"
        " AND l.classid = $1 AND l.objid = $2 AND l.objsubid = 2")


async def armed(conn: asyncpg.Connection) -> bool:
    """A worker holds the bell: it sleeps, and the next writer transaction notifies."""
    return bool(await conn.fetchval(HELD, BELL_CLASS, BELL_KEY))
