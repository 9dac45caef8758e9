"""What the claim's hot path needs from the planner rides on the claim functions (migration
0009), not on startup parameters a pooler refuses: checked on the migrated schema, and on the
sessions the worker's connections open."""

from __future__ import annotations

import asyncpg
import pytest

from sensor_predictor import db
from sensor_predictor.config import load_settings
from tests.support.databases import Database

pytestmark = pytest.mark.asyncio

HOT_PATH = ("sp_claim", "sp_claim_next", "sp_claim_read", "sp_take_orphan")


async def test_every_claim_function_turns_jit_and_parallel_workers_off(
        conn: asyncpg.Connection) -> None:
    rows = await conn.fetch("SELECT p.oid::regprocedure::text AS f, p.proconfig FROM pg_proc p "
                            "WHERE p.proname = ANY($1::text[])", list(HOT_PATH))
    assert {r["f"].split("(")[0] for r in rows} == set(HOT_PATH)
    for r in rows:
        config = set(r["proconfig"] or [])
        assert {"jit=off", "max_parallel_workers_per_gather=0"} <= config, (r["f"], config)
        # ALTER FUNCTION ... SET adds; the search_path each function declares stays.
        assert any(c.startswith("search_path=") for c in config), (r["f"], config)


async def test_the_worker_sends_no_startup_parameter_but_its_name(database: Database) -> None:
    settings = load_settings(database.env())
    c = await db.connect(settings)
    try:
        # The server's defaults stand (what a pooler would pass through): nothing overridden
        # by the client at startup but application_name.
        rows = await c.fetch("SELECT name FROM pg_settings WHERE source = 'client'")
        assert {r["name"] for r in rows} <= {"application_name", "client_encoding",
                                             "DateStyle", "TimeZone"}, rows
    finally:
        await c.close()
