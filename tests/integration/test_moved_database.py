"""A database moved by pg_dump into a cluster whose transaction counter is lower (as a move to a
managed service does): detected at the next claim, re-anchored, and every reading written on
either side scored exactly once, including restored readings whose txid the new counter only
passes later. And a writer that sets txid itself (INSERT, COPY) cannot hide its readings."""

from __future__ import annotations

import asyncio
import json
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from sensor_predictor import db
from sensor_predictor.devtools.postgres import PgServer, pg_bin, start_cluster, stop_cluster
from sensor_predictor.devtools.tally import tally
from tests.support.databases import Database
from tests.support.readings import insert_readings, machine_id, reading

pytestmark = pytest.mark.asyncio


@pytest.fixture
def fresh_cluster() -> Iterator[PgServer]:
    """A cluster of its own: a transaction counter far behind the shared server's."""
    server = start_cluster({"fsync": "off"}, prefix="sp-moved-")
    yield server
    stop_cluster(server)


async def _burn_xids(conn: asyncpg.Connection, until: int) -> None:
    """Consume transaction ids until the counter reaches `until`."""
    await conn.execute(
        "DO $$ BEGIN WHILE pg_current_xact_id()::text::bigint < " + str(int(until)) +
        " LOOP COMMIT; END LOOP; END $$")


async def _counter(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())::text"))


async def _drain(conn: asyncpg.Connection, batch: int = 7, stop_after: int | None = None
                 ) -> tuple[list[int], list[str]]:
    """Claim and 'score' (the worker's own write statement) until nothing is new; the ids
    written and the re-anchor reasons seen. stop_after: leave after that many claims, with
    the last claim handed out and never written (a worker that died)."""
    q = db.queries()
    written: list[int] = []
    reasons: list[str] = []
    held: int | None = None
    claims = 0
    while True:
        row = await conn.fetchrow(q["claim"], "t", batch, None, held)
        held = None
        if row is None:
            return written, reasons
        if row["reanchored"]:
            reasons.append(row["reanchored"])
        if row["claim_id"] is None:
            if row["full"]:
                continue
            return written, reasons
        ids = list(row["reading_ids"])
        claims += 1
        if stop_after is not None and claims > stop_after:
            return written, reasons
        n = len(ids)
        taken = await conn.fetchval(q["write_claim"], row["claim_id"], ids, [0] * n, [1.0] * n,
                                    "1", "run", "m", [], [], [], [0] * n, 0)
        assert taken == 1
        written.extend(ids)
        held = row["claim_id"]


GROUP_ROLES = ("sensor_predictor_worker", "sensor_predictor_trainer", "sensor_predictor_simulator")


async def _restore(dump: Path, target: PgServer, name: str) -> None:
    # Roles are global, not in a database's dump: as in a real move, the group roles the
    # migrations made (0002, 0011) are created on the new cluster first.
    admin = await target.connect()
    for role in GROUP_ROLES:
        await admin.execute(f"CREATE ROLE {role} NOLOGIN")
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    cmd = [pg_bin("pg_restore"), "-h", target.host, "-p", str(target.port), "-U", target.user,
           "-d", name, "--exit-on-error", str(dump)]
    done = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True,
                                   check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_dump_restored_into_a_lower_counter_scores_everything_exactly_once(
        database: Database, conn: asyncpg.Connection, fresh_cluster: PgServer) -> None:
    # The old cluster: some readings scored, some handed out and never written (a claim in
    # flight at the dump), some not handed out yet.
    await _burn_xids(conn, await _counter(conn) + 3000)  # well ahead of the fresh cluster
    scored = await insert_readings(conn, [reading(i) for i in range(30)])
    assert sorted((await _drain(conn))[0]) == scored
    in_claim = await insert_readings(conn, [reading(i) for i in range(10)])
    # One claim of 4 written, the next 4 left in a claim nobody will write, 2 not handed out.
    early, _ = await _drain(conn, batch=4, stop_after=1)
    assert len(early) == 4
    in_claim = sorted(set(in_claim) - set(early))
    waiting = await insert_readings(conn, [reading(i) for i in range(5)])
    old_counter = await _counter(conn)

    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "db.dump"
        s = database.server
        cmd = [pg_bin("pg_dump"), "-h", s.host, "-p", str(s.port), "-U", s.user, "-Fc",
               "-f", str(dump), database.name]
        done = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True,
                                       check=False)
        assert done.returncode == 0, done.stderr
        await _restore(dump, fresh_cluster, "moved")
    new = await fresh_cluster.connect("moved")
    try:
        assert await _counter(new) < old_counter
        # Before any claim: the backlog counts everything without a result, not 0.
        unscored = len(in_claim) + len(waiting)
        assert await new.fetchval("SELECT sp_backlog()") == unscored
        # Readings written on the new side, then claims.
        after_move = await insert_readings(new, [reading(i) for i in range(12)])
        handed, reasons = await _drain(new)
        assert reasons == ["system_identifier"]
        assert sorted(handed) == sorted(in_claim + waiting + after_move)
        assert await new.fetchval("SELECT count(*) FROM scoring_claims") == 0
        assert await new.fetchval("SELECT sp_backlog()") == 0
        # The protocol goes on from the re-anchor, and once the counter passes the restored
        # readings' txids, they are not handed out a second time.
        later = await insert_readings(new, [reading(i) for i in range(6)])
        assert sorted((await _drain(new))[0]) == later
        await _burn_xids(new, old_counter + 10)
        last = await insert_readings(new, [reading(i) for i in range(3)])
        handed, reasons = await _drain(new)
        assert sorted(handed) == last and reasons == []
        assert await new.fetchval("SELECT sp_backlog()") == 0
        t = await tally(new)
        assert t.exactly_once and t.readings == 30 + 10 + 5 + 12 + 6 + 3, t
        assert t.predicted == t.readings
        assert await new.fetchval("SELECT reanchors FROM scoring_cursor") == 1
    finally:
        await new.close()


@pytest.mark.timeout(60)
async def test_a_counter_behind_the_cursor_on_the_same_cluster_is_caught_too(
        conn: asyncpg.Connection) -> None:
    """The cursor restored from a later state of the same cluster (a counter behind it):
    re-anchored, nothing skipped."""
    first = await insert_readings(conn, [reading(i) for i in range(5)])
    assert sorted((await _drain(conn))[0]) == first
    await conn.execute("UPDATE scoring_cursor SET snap = ((pg_snapshot_xmax(snap)::text::bigint"
                       " + 100000)::text || ':' || (pg_snapshot_xmax(snap)::text::bigint"
                       " + 100000)::text || ':')::pg_snapshot")
    assert await conn.fetchval("SELECT sp_cursor_moved()") == "counter_behind"
    more = await insert_readings(conn, [reading(i) for i in range(4)])
    assert await conn.fetchval("SELECT sp_backlog()") == len(more)
    handed, reasons = await _drain(conn)
    assert reasons == ["counter_behind"] and sorted(handed) == more
    assert (await tally(conn)).exactly_once


@pytest.mark.timeout(60)
async def test_a_writer_cannot_set_txid(conn: asyncpg.Connection) -> None:
    """An explicit txid (INSERT naming the column, COPY of an export carrying it) is replaced
    by the writer's own transaction: the readings are handed out like any other."""
    await insert_readings(conn, [reading(0)])
    assert (await _drain(conn))[0]  # the cursor's snapshot is past everything so far
    machine = await machine_id(conn)
    explicit = await conn.fetchval(
        'INSERT INTO readings ("values", machine_id, txid) VALUES ($1::jsonb, $2, \'5\')'
        " RETURNING id", json.dumps(reading(1)), machine)
    await conn.copy_records_to_table(
        "readings", columns=["values", "machine_id", "txid"],
        records=[(json.dumps(reading(2)), machine, 7), (json.dumps(reading(3)), machine, 9)])
    copied = [r["id"] for r in await conn.fetch("SELECT id FROM readings WHERE id > $1",
                                                explicit)]
    assert await conn.fetchval("SELECT count(*) FROM readings WHERE txid < '10'") == 0
    assert await conn.fetchval("SELECT sp_backlog()") == 3
    handed, _ = await _drain(conn)
    assert sorted(handed) == [explicit, *copied]


@pytest.mark.timeout(60)
async def test_an_update_of_txid_keeps_the_reading_handed_out(conn: asyncpg.Connection) -> None:
    """A writer that rewrites txid (an ORM saving every column, a fix-up script) after the
    insert: the reading keeps its own txid, is counted in the backlog and handed out once."""
    await insert_readings(conn, [reading(0)])
    assert (await _drain(conn))[0]  # the cursor's snapshot is past everything so far
    [late] = await insert_readings(conn, [reading(1)])
    before = await conn.fetchval("SELECT txid FROM readings WHERE id = $1", late)
    await conn.execute("UPDATE readings SET txid = '5' WHERE id = $1", late)
    await conn.execute("UPDATE readings SET txid = pg_current_xact_id() WHERE id = $1", late)
    assert await conn.fetchval("SELECT txid FROM readings WHERE id = $1", late) == before
    assert await conn.fetchval("SELECT sp_backlog()") == 1
    handed, _ = await _drain(conn)
    assert handed == [late]
    assert (await tally(conn)).exactly_once


@pytest.mark.timeout(60)
async def test_the_backlog_is_the_truth_before_during_and_after_a_sweep(
        conn: asyncpg.Connection) -> None:
    """Restored readings whose txid is beyond the new counter are swept once and counted once:
    sp_backlog() equals the readings with neither a prediction nor an error at every step of a
    re-anchor's sweep (claimed, written, then new readings after it)."""
    q = db.queries()
    ids = await insert_readings(conn, [reading(i) for i in range(10)])
    # 3 rows restored from a cluster whose counter was ahead (as pg_restore loads them: before
    # the triggers exist, so none fires), then the cursor found on another cluster.
    await conn.execute("SET session_replication_role = replica")
    await conn.execute("UPDATE readings SET txid = (pg_current_xact_id()::text::bigint"
                       " + 1000000)::text::xid8 WHERE id = ANY ($1::bigint[])", ids[:3])
    await conn.execute("RESET session_replication_role")
    await conn.execute("UPDATE scoring_cursor SET system_identifier = 42")

    async def check() -> None:
        truth = await conn.fetchval(
            "SELECT count(*) FROM readings r"
            " WHERE NOT EXISTS (SELECT 1 FROM predictions p WHERE p.reading_id = r.id)"
            " AND NOT EXISTS (SELECT 1 FROM reading_errors e WHERE e.reading_id = r.id)")
        assert await conn.fetchval("SELECT sp_backlog()") == truth

    await check()
    claims = []
    while (row := await conn.fetchrow(q["claim"], "t", 2, None, None)) is not None:
        if row["claim_id"] is None and not row["full"]:
            break
        if row["claim_id"] is not None:
            claims.append((row["claim_id"], list(row["reading_ids"])))
        await check()  # during the sweep, claims held
    assert sorted(i for _, c in claims for i in c) == ids
    for claim_id, handed in claims:
        n = len(handed)
        assert await conn.fetchval(q["write_claim"], claim_id, handed, [0] * n, [1.0] * n,
                                   "1", "run", "m", [], [], [], [0] * n, 0) == 1
        await check()  # claims written one by one
    assert await conn.fetchval("SELECT sweep_id FROM scoring_cursor") is None
    await insert_readings(conn, [reading(i) for i in range(4)])
    await check()  # after the sweep: only the new readings
    assert await conn.fetchval("SELECT sp_backlog()") == 4
