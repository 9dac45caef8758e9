"""The least-privileged worker role (migrations/0002), and no password in any output."""

from __future__ import annotations

import asyncio
import subprocess
from typing import Any

import asyncpg
import pytest

from sensor_predictor import db
from sensor_predictor.training import activate_model
from tests.support.chaos import check_invariant, served, wait_settled
from tests.support.chaos_fixtures import WORKER_ROLE, LoginRole, Workers
from tests.support.databases import Database
from tests.support.models import Models
from tests.support.readings import insert_readings, reading

pytestmark = [pytest.mark.asyncio, pytest.mark.security]


# -- the role's privileges -----------------------------------------------------------------------

# relation -> privileges granted to the worker role (tables and sequences, table level)
EXPECTED_RELATION_GRANTS = {
    "readings": {"SELECT"},
    "clusters": {"SELECT"},
    "versions": {"SELECT"},
    "scoring_cursor": {"SELECT", "UPDATE"},
    "scoring_claims": {"SELECT", "INSERT", "DELETE"},
    "predictions": {"INSERT"},
    "reading_errors": {"INSERT"},
    "drift": {"SELECT", "INSERT", "UPDATE"},
    "scoring_claims_id_seq": {"USAGE"},
    "predictions_id_seq": {"USAGE"},
    "reading_errors_id_seq": {"USAGE"},
    "drift_id_seq": {"USAGE"},
    # stable cluster ids (0005): a model's mapping, written at its first use
    "cluster_models": {"SELECT", "INSERT"},
    "cluster_ids": {"SELECT", "INSERT"},
    # shadow scoring (0006): the candidate is read, its rows and evaluations written
    "model_candidates": {"SELECT"},
    "shadow_predictions": {"INSERT"},
    "shadow_evaluations": {"INSERT"},
    # an adopted backlog (0014): the list of adopted rows still waiting, read by the claim
    "scoring_adopted": {"SELECT"},
    "scoring_adoption": {"SELECT"},
    "shadow_evaluations_id_seq": {"USAGE"},
    # the digest of a model's artifacts, recorded when it is first served (0011)
    "model_artifact_digests": {"SELECT", "INSERT"},
}
EXPECTED_COLUMN_GRANTS = {
    ("versions", "is_processed", "UPDATE"),
    # a claim taken over from a worker whose session ended gets its new owner
    ("scoring_claims", "worker", "UPDATE"), ("scoring_claims", "pid", "UPDATE"),
    ("scoring_claims", "claimed_at", "UPDATE"), ("scoring_claims", "takeovers", "UPDATE"),
    # a lease: moved by a takeover, renewed by its owner (migration 0008)
    ("scoring_claims", "lease_until", "UPDATE"),
    # rescore's INSERT ... ON CONFLICT (reading_id, model_version) DO NOTHING reads them
    ("predictions", "reading_id", "SELECT"), ("predictions", "model_version", "SELECT"),
    ("reading_errors", "reading_id", "SELECT"), ("reading_errors", "model_version", "SELECT"),
    # the model swapped in becomes the reference for the next alignment
    ("cluster_models", "served_at", "UPDATE"),
    # a promoted candidate is marked so; a batch written twice keeps its first shadow rows
    ("model_candidates", "promoted_at", "UPDATE"),
    ("shadow_predictions", "reading_id", "SELECT"),
    ("shadow_predictions", "model_version", "SELECT"),
}


async def test_the_worker_role_is_granted_exactly_what_the_worker_needs(
        chaos_conn: asyncpg.Connection) -> None:
    conn = chaos_conn
    assert await conn.fetchval(
        "SELECT NOT rolcanlogin AND NOT rolsuper AND NOT rolcreatedb AND NOT rolcreaterole"
        " AND NOT rolbypassrls FROM pg_roles WHERE rolname = $1", WORKER_ROLE)
    grants: dict[str, set[str]] = {}
    for r in await conn.fetch(
            "SELECT c.relname, a.privilege_type FROM pg_class c, aclexplode(c.relacl) a"
            " WHERE c.relnamespace = 'public'::regnamespace AND a.grantee = $1::regrole",
            WORKER_ROLE):
        grants.setdefault(r["relname"], set()).add(r["privilege_type"])
    assert grants == EXPECTED_RELATION_GRANTS
    columns = {(r["relname"], r["attname"], r["privilege_type"]) for r in await conn.fetch(
        "SELECT c.relname, a.attname, x.privilege_type"
        "  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid, aclexplode(a.attacl) x"
        " WHERE c.relnamespace = 'public'::regnamespace AND x.grantee = $1::regrole",
        WORKER_ROLE)}
    assert columns == EXPECTED_COLUMN_GRANTS
    executable = {r[0] for r in await conn.fetch(
        "SELECT p.proname FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace"
        " AND has_function_privilege($1, p.oid, 'EXECUTE')", WORKER_ROLE)}
    # Trigger functions stay executable by PUBLIC (PostgreSQL's default; a trigger fires
    # whatever the inserting role may execute); the claim functions are the worker's alone.
    assert {"sp_claim", "sp_take_orphan", "sp_backlog"} <= executable
    for signature in ("sp_claim(text, integer)", "sp_take_orphan(text, double precision)",
                      "sp_claim_read(text, integer, text)"):
        assert not await conn.fetchval(
            "SELECT has_function_privilege('public', $1, 'EXECUTE')", signature)
    # No DDL: no CREATE on the schema or the database, owns nothing.
    assert not await conn.fetchval("SELECT has_schema_privilege($1, 'public', 'CREATE')",
                                   WORKER_ROLE)
    assert not await conn.fetchval(
        "SELECT has_database_privilege($1, current_database(), 'CREATE')", WORKER_ROLE)


# Statements the worker role must not be able to run (each with the role's own connection).
FORBIDDEN = [
    "DELETE FROM readings",
    "UPDATE readings SET machine_id = machine_id",
    "INSERT INTO readings (\"values\", machine_id) VALUES ('{}', 1)",
    "TRUNCATE readings",
    "DROP TABLE predictions",
    "ALTER TABLE predictions ADD COLUMN evil int",
    "CREATE TABLE evil (id int)",
    "CREATE INDEX evil_idx ON readings (id)",
    "DELETE FROM predictions",
    "UPDATE predictions SET cluster_id = 0",
    "SELECT cluster_id FROM predictions",
    "SELECT * FROM predictions",
    "SELECT detail FROM reading_errors",
    "DELETE FROM reading_errors",
    "SELECT count(*) FROM machines",
    "SELECT count(*) FROM failures",
    "UPDATE clusters SET is_active = true",
    "INSERT INTO clusters (mlflow_run_id, is_active) VALUES ('x', true)",
    "UPDATE versions SET version = 'x'",
    "DELETE FROM drift",
    "UPDATE scoring_claims SET reading_ids = '{}'",
    "SELECT count(*) FROM schema_migrations",
    "DROP FUNCTION sp_claim(text, integer)",
    "CREATE FUNCTION evil() RETURNS int LANGUAGE sql AS 'SELECT 1'",
]


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_login_role_with_the_worker_role_scores_and_can_do_nothing_else(
        chaos_db: Database, chaos_conn: asyncpg.Connection, chaos_models: Models,
        workers: Workers, login_role: LoginRole, report: Any) -> None:
    conn = chaos_conn
    run_id, version = chaos_models.v1
    await activate_model(conn, run_id, version)  # with its versions notice, for the worker to mark
    as_role = {"POSTGRES_USER": login_role.name, "POSTGRES_PASSWORD": "",
               "POSTGRES_PASSWORD_FILE": str(login_role.password_file),
               # A small window, a low threshold and no significance rule: drift rows get
               # written too (the role must be allowed to write them).
               "DRIFT_DETECTION_WINDOW": "50", "DRIFT_THRESHOLD": "0.01", "DRIFT_P_VALUE": "1"}
    worker = workers.start("--no-migrate", **as_role)
    await asyncio.to_thread(worker.wait_ready)
    await insert_readings(conn, [reading(i) for i in range(300)])
    await insert_readings(conn, [reading(1000, **{"Sensor 1": "broken"}), {}, "[1]", None])
    assert await wait_settled(conn, 30), worker.logs()[-3000:]
    outcome = await check_invariant(conn, served(chaos_models.v1), 304)
    assert outcome.tally.errors == 4
    assert await conn.fetchval("SELECT bool_and(is_processed) FROM versions")
    assert await conn.fetchval("SELECT count(*) FROM drift") >= 1
    events = {e.get("event") for e in worker.events()}
    assert not events & {"batch_failed", "versions_not_marked", "drift_write_failed",
                         "model_load_failed"}, worker.logs()[-3000:]
    # It connected as the login role, with the password from the file (scram, not trust).
    assert await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = $1"
        " AND application_name = 'sensor-predictor-listener'", login_role.name) == 1
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(**{**chaos_db.server.kwargs(chaos_db.name),
                                 "user": login_role.name, "password": "wrong"})

    role_conn = await asyncpg.connect(**{**chaos_db.server.kwargs(chaos_db.name),
                                         "user": login_role.name,
                                         "password": login_role.password})
    refused: list[str] = []
    allowed: list[str] = []
    try:
        for statement in FORBIDDEN:
            try:
                await role_conn.execute(statement)
            except asyncpg.InsufficientPrivilegeError:
                refused.append(statement)
            else:
                allowed.append(statement)
        # What `sensor-predictor rescore` writes (ON CONFLICT DO NOTHING), rolled back.
        queries = db.queries()
        rescore = role_conn.transaction()
        await rescore.start()
        reading_id = await conn.fetchval("SELECT min(id) FROM readings")
        try:
            assert await role_conn.fetchval(
                queries["rescore_insert_predictions"], [reading_id], [0], [0.5], "rescore-probe",
                run_id, "probe", [0]) == 1
            assert await role_conn.fetchval(
                queries["rescore_insert_errors"], [reading_id], ["probe"], ["probe"],
                "rescore-probe") == 1
        finally:
            await rescore.rollback()
        # Foreign keys are checked as the referenced table's owner: the role writes an error
        # row for a reading (INSERT only) though it may not lock or update readings itself.
        assert not await role_conn.fetchval("SELECT has_table_privilege('readings', 'UPDATE')")
        probe = role_conn.transaction()
        await probe.start()
        try:
            await role_conn.execute(
                "INSERT INTO reading_errors (reading_id, reason, detail, model_version)"
                " VALUES ($1, 'probe', 'fk checked as the owner', 'probe')", reading_id)
            await role_conn.execute("SAVEPOINT missing_reading")
            with pytest.raises(asyncpg.ForeignKeyViolationError):
                await role_conn.execute(
                    "INSERT INTO reading_errors (reading_id, reason, detail, model_version)"
                    " VALUES (-1, 'probe', 'no such reading', 'probe')")
        finally:
            await probe.rollback()  # leave nothing behind
    finally:
        await role_conn.close()
    assert allowed == [], allowed
    report(scenario="security: least-privileged worker role", runs=1,
           readings=outcome.tally.readings, lost=outcome.lost, duplicated=outcome.duplicated,
           recovery="n/a",
           detail=(f"scored as {login_role.name} (password from POSTGRES_PASSWORD_FILE, scram); "
                   f"{len(refused)} forbidden statements all refused"))


@pytest.mark.slow
async def test_the_worker_role_without_no_migrate_fails_fast_and_changes_nothing(
        chaos_db: Database, chaos_conn: asyncpg.Connection, chaos_models: Models,
        workers: Workers, login_role: LoginRole, report: Any) -> None:
    """Started as the least-privileged role *with* its default migrate-on-start, the worker
    cannot run the migration (no DDL): it must stop at once and say why, not score."""
    conn = chaos_conn
    await activate_model(conn, *chaos_models.v1)
    await insert_readings(conn, [reading(i) for i in range(5)])
    ledger = await conn.fetch("SELECT * FROM schema_migrations ORDER BY version")
    worker = workers.start(POSTGRES_USER=login_role.name, POSTGRES_PASSWORD="",
                           POSTGRES_PASSWORD_FILE=str(login_role.password_file))
    try:
        code = await asyncio.to_thread(worker.wait, 60)
    except subprocess.TimeoutExpired:
        code = None
    output = worker.logs()
    report(scenario="security: worker role without --no-migrate", runs=1, readings=5,
           lost="-", duplicated="-", recovery="n/a",
           detail=f"exit code {code}; last line: {output.strip().splitlines()[-1][:200]}")
    assert code is not None and code != 0, output[-3000:]
    assert "permission denied" in output, output[-3000:]
    assert await conn.fetchval("SELECT count(*) FROM predictions") == 0
    assert await conn.fetch("SELECT * FROM schema_migrations ORDER BY version") == ledger
