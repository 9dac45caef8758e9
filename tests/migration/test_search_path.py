"""Every function of ours fixes its search_path (migration 0011, CVE-2018-1058), and still works
for a caller whose own search_path puts a hostile schema first. The trainer's and the
simulator's roles (0011) can do their work and nothing else."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import pytest

from sensor_predictor import db
from sensor_predictor.training import activate_model, mark_candidate
from tests.support.databases import Database
from tests.support.readings import insert_readings, reading
from tests.support.waiting import wait_for

pytestmark = pytest.mark.asyncio

FIXED = "search_path=pg_catalog, public, pg_temp"


async def test_every_function_of_ours_sets_search_path(conn: asyncpg.Connection) -> None:
    rows = await conn.fetch(
        "SELECT p.oid::regprocedure::text AS signature, p.proconfig FROM pg_proc p"
        " WHERE p.pronamespace = 'public'::regnamespace AND NOT EXISTS (SELECT 1 FROM pg_depend d"
        "  WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')")
    names = {r["signature"].split("(")[0] for r in rows}
    # Ours, at least (later migrations add more; each must be fixed too).
    assert {"sp_claim", "sp_claim_read", "sp_take_orphan", "sp_backlog", "sp_claim_lock_key",
            "sp_notify_readings", "sp_notify_model"} <= names, names
    unfixed = [r["signature"] for r in rows if FIXED not in (r["proconfig"] or [])]
    assert unfixed == [], f"functions without `SET search_path = pg_catalog, public, pg_temp`: " \
                          f"{unfixed}"


async def test_functions_ignore_a_hostile_search_path(database: Database,
                                                      conn: asyncpg.Connection) -> None:
    """A schema first on the caller's path with look-alike tables: the triggers still notify
    and the claim function still hands out the real readings."""
    await conn.execute(
        "CREATE SCHEMA hostile; CREATE TABLE hostile.scoring_cursor (LIKE scoring_cursor);"
        " CREATE TABLE hostile.readings (LIKE readings); CREATE TABLE hostile.scoring_claims"
        " (LIKE scoring_claims); GRANT USAGE ON SCHEMA hostile TO PUBLIC;"
        " GRANT ALL ON ALL TABLES IN SCHEMA hostile TO PUBLIC")
    notices: list[str] = []
    await conn.add_listener("sensor_readings", lambda *a: notices.append(a[1]))
    ids = await insert_readings(conn, [reading(i) for i in range(5)])
    notices.clear()
    # A worker asleep holds the bell (migration 0013), on a session of its own: writers notify.
    asleep = await database.connect()
    await asleep.execute("SELECT pg_advisory_lock(21329, 2)")
    try:
        await conn.execute("SET search_path = hostile, public")
        ids.append(await conn.fetchval(
            'INSERT INTO public.readings ("timestamp", "values", machine_id)'
            ' SELECT now(), "values", machine_id FROM public.readings LIMIT 1 RETURNING id'))
        async def notified() -> bool:
            return bool(notices)

        await wait_for(notified, 5)
        assert notices, "the readings trigger did not notify"
        await conn.execute("SET ROLE sensor_predictor_worker")
        claimed: list[int] = []
        for _ in range(5):
            row = await conn.fetchrow("SELECT claim_id, reading_ids FROM sp_claim('t', 100)")
            if row is None:
                break
            claimed += list(row["reading_ids"] or [])
        assert sorted(claimed) == sorted(ids)
        assert await conn.fetchval("SELECT sp_backlog()") is not None
    finally:
        await conn.execute("RESET ROLE; RESET search_path")
        await asleep.close()


async def test_trainer_and_simulator_roles_do_their_work_and_nothing_else(
        conn: asyncpg.Connection) -> None:
    q = db.queries()
    await conn.execute("SET ROLE sensor_predictor_simulator")
    machines = await conn.fetch(q["sim_register_machines"], ["sim-1"])
    failure = await conn.fetchval(q["sim_open_failure"], datetime.now(UTC), machines[0]["id"])
    await conn.execute(q["sim_insert_readings"].replace(
        "{rows}", f"(now(), '{{}}', {machines[0]['id']}, {failure})"))
    await conn.execute(q["sim_touch_machines"], [machines[0]["id"]])
    for forbidden in ("SELECT count(*) FROM readings", "SELECT count(*) FROM predictions",
                      "UPDATE clusters SET is_active = true", "DELETE FROM readings"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(forbidden)
    await conn.execute("RESET ROLE; SET ROLE sensor_predictor_trainer")
    assert len(await conn.fetch(q["training_readings"], 10)) == 1
    await activate_model(conn, "run-a", 1, 4, 0.5, {"0": {"a": 1.0}})
    await activate_model(conn, "run-b", 2)
    assert await mark_candidate(conn, "run-c", 3) > 0
    for forbidden in ("SELECT count(*) FROM predictions", "DELETE FROM readings",
                      "INSERT INTO readings (\"values\", machine_id) VALUES ('{}', 1)",
                      "UPDATE model_candidates SET withdrawn_at = now()",
                      "SELECT count(*) FROM machines"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(forbidden)
    await conn.execute("RESET ROLE")
    assert await conn.fetchval("SELECT mlflow_run_id FROM clusters WHERE is_active") == "run-b"
