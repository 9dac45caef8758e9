"""The claim protocol itself (sp_claim, sp_take_orphan), driven from SQL against a real server:
what is handed out, when, and that nothing is handed out twice or never."""

from __future__ import annotations

import asyncio
import json
import random
import uuid

import asyncpg
import pytest

from sensor_predictor import db
from sensor_predictor.devtools.postgres import PgServer, drop_database
from sensor_predictor.scoring import find_orphans
from sensor_predictor.worker import next_orphan_look
from tests.support.databases import Database
from tests.support.readings import insert_readings, reading
from tests.support.waiting import wait_for

pytestmark = pytest.mark.asyncio


async def _claim_all(conn: asyncpg.Connection, batch: int = 50) -> list[int]:
    """Claim until nothing new; 'score' each claim by deleting it. Returns the ids handed out."""
    out: list[int] = []
    while True:
        row = await conn.fetchrow("SELECT claim_id, reading_ids FROM sp_claim('t', $1)", batch)
        if row is None:
            return out
        if row["claim_id"] is None:
            continue
        out.extend(row["reading_ids"])
        await conn.execute("DELETE FROM scoring_claims WHERE id = $1", row["claim_id"])


async def test_a_transaction_open_in_another_database_holds_nothing_back(
        pg_server: PgServer, database: Database, conn: asyncpg.Connection) -> None:
    other = f"sp_other_{uuid.uuid4().hex[:8]}"
    admin = await pg_server.connect()
    await admin.execute(f'CREATE DATABASE "{other}"')
    await admin.close()
    foreign = await pg_server.connect(other)
    try:
        tx = foreign.transaction()
        await tx.start()
        await foreign.execute("SELECT pg_current_xact_id()")  # a write transaction, left open
        ids = await insert_readings(conn, [reading(i) for i in range(120)])
        assert sorted(await _claim_all(conn)) == ids
        await tx.commit()
    finally:
        await foreign.close()
        await drop_database(pg_server, other)


async def test_an_open_writer_is_handed_out_when_it_commits_and_others_meanwhile(
        database: Database, conn: asyncpg.Connection) -> None:
    slow = await database.connect()
    try:
        tx = slow.transaction()
        await tx.start()
        early = await insert_readings(slow, [reading(i) for i in range(5)], machine="slow")
        later = await insert_readings(conn, [reading(i) for i in range(7)])
        assert sorted(await _claim_all(conn)) == later  # not the open transaction's rows
        assert await _claim_all(conn) == []
        await tx.commit()
        assert sorted(await _claim_all(conn)) == early  # as soon as it has committed
    finally:
        await slow.close()


async def test_rolled_back_rows_are_never_handed_out(
        database: Database, conn: asyncpg.Connection) -> None:
    other = await database.connect()
    try:
        tx = other.transaction()
        await tx.start()
        await insert_readings(other, [reading(1)], machine="gone")
        kept = await insert_readings(conn, [reading(2)])
        await tx.rollback()
        assert await _claim_all(conn) == kept
    finally:
        await other.close()


@pytest.mark.timeout(120)
async def test_interleaved_writers_commits_and_aborts_are_handed_out_exactly_once(
        database: Database, conn: asyncpg.Connection) -> None:
    """Writers that take ids early and commit late, abort, or stay open across many claims;
    claims interleaved at random: every committed reading is handed out exactly once."""
    rnd = random.Random(11)
    writers = [await database.connect() for _ in range(6)]
    machine = await conn.fetchval("INSERT INTO machines (machine_id) VALUES ('w') RETURNING id")
    open_tx: dict[int, tuple[asyncpg.transaction.Transaction, list[int]]] = {}
    committed: list[int] = []
    handed: list[int] = []
    insert = 'INSERT INTO readings ("values", machine_id) VALUES ($1::jsonb, $2) RETURNING id'
    try:
        for step in range(600):
            w = rnd.randrange(len(writers))
            action = rnd.random()
            if w not in open_tx:
                tx = writers[w].transaction()
                await tx.start()
                if rnd.random() < 0.3:  # a sequence value before the transaction has an xid
                    await writers[w].fetchval("SELECT nextval('readings_id_seq')")
                open_tx[w] = (tx, [])
            tx, ids = open_tx[w]
            if action < 0.5:
                ids.append(await writers[w].fetchval(insert, json.dumps(reading(step)), machine))
            elif action < 0.8:
                await tx.commit()
                committed.extend(ids)
                del open_tx[w]
            elif action < 0.85:
                await tx.rollback()
                del open_tx[w]
            if rnd.random() < 0.4:
                handed.extend(await _claim_all(conn, batch=rnd.choice([1, 3, 10])))
        for tx, ids in open_tx.values():
            await tx.commit()
            committed.extend(ids)
        handed.extend(await _claim_all(conn))
    finally:
        for c in writers:
            await c.close()
    assert len(handed) == len(set(handed)), "a reading was handed out twice"
    assert sorted(handed) == sorted(committed)
    assert len(committed) > 100


async def test_a_claim_is_taken_over_once_its_session_ends_and_never_while_it_lives(
        database: Database, conn: asyncpg.Connection) -> None:
    ids = await insert_readings(conn, [reading(i) for i in range(10)])
    owner = await database.connect()
    claim = await owner.fetchrow("SELECT claim_id, reading_ids FROM sp_claim('owner', 100)")
    assert claim["reading_ids"] == ids
    # Alive, however slow: left alone, until the long half-open fallback.
    await asyncio.sleep(0.3)
    assert await conn.fetchrow("SELECT * FROM sp_take_orphan('taker', 60)") is None
    fallback = await conn.fetchrow("SELECT * FROM sp_take_orphan('taker', 0.2)")
    assert fallback is not None and fallback["claim_id"] == claim["claim_id"]
    # The fallback restarts the claim's clock: one taker at a time.
    assert await conn.fetchrow("SELECT * FROM sp_take_orphan('taker', 0.2)") is None
    await owner.close()  # the session ends: its lock goes with it

    async def take() -> asyncpg.Record | None:
        return await conn.fetchrow("SELECT * FROM sp_take_orphan('taker', 60)")

    taken = await wait_for(take, timeout=2)
    assert taken is not None and taken["claim_id"] == claim["claim_id"]
    # The last owner: the fallback made the claim the taker's (its lock stayed with the owner).
    assert taken["previous_worker"] == "taker" and taken["reading_ids"] == ids
    # Now it is the taker's, and a third worker cannot take it from a live taker.
    third = await database.connect()
    try:
        assert await third.fetchrow("SELECT * FROM sp_take_orphan('third', 60)") is None
    finally:
        await third.close()


async def test_the_backlog_counts_what_is_waiting_claimed_or_not(
        database: Database, conn: asyncpg.Connection) -> None:
    await insert_readings(conn, [reading(i) for i in range(30)])
    assert await conn.fetchval("SELECT sp_backlog()") == 30
    first = await conn.fetchrow("SELECT claim_id, reading_ids FROM sp_claim('t', 10)")
    assert await conn.fetchval("SELECT sp_backlog()") == 30  # 10 claimed, 20 in the interval
    await conn.execute("DELETE FROM scoring_claims WHERE id = $1", first["claim_id"])
    assert await conn.fetchval("SELECT sp_backlog()") == 20
    await _claim_all(conn)
    assert await conn.fetchval("SELECT sp_backlog()") == 0
    await insert_readings(conn, [reading(i) for i in range(4)])
    assert await conn.fetchval("SELECT sp_backlog()") == 4


async def test_adopted_rows_scored_by_the_old_predictor_are_skipped_and_the_claim_says_full(
        database: Database, conn: asyncpg.Connection) -> None:
    """Rows from before the txid column read as txid '0'; those the old predictor scored are
    passed over, and a claim looks further to fill its batch, so an adopted backlog drains in
    batches as large as a fresh one's."""
    ids = await insert_readings(conn, [reading(i) for i in range(40)])
    # As an adopted database reads them. The trigger that keeps a reading's txid is off for
    # this session only (replica role: ordinary triggers do not fire), as on the old system.
    await conn.execute("SET session_replication_role = replica")
    await conn.execute("UPDATE readings SET txid = '0'")
    await conn.execute("RESET session_replication_role")
    scored = ids[::2]
    await conn.execute(
        "INSERT INTO predictions (reading_id, cluster_id, model_version)"
        " SELECT unnest($1::bigint[]), 0, '1'", scored)
    first = await conn.fetchrow('SELECT claim_id, reading_ids, "full" FROM sp_claim($1, 10)',
                                "t")
    # Up to 4 batches of rows are looked at to fill one: 10 to score among the first 20.
    assert first["full"] and len(first["reading_ids"]) == 10
    assert set(first["reading_ids"]).isdisjoint(scored)
    await conn.execute("DELETE FROM scoring_claims")
    handed = first["reading_ids"] + await _claim_all(conn, batch=10)
    assert sorted(handed) == sorted(set(ids) - set(scored))


async def _advisory_locks(conn: asyncpg.Connection, pid: int) -> set[tuple[int, int]]:
    """(class, key) of a two-key lock; (-1, key) of a one-key (bigint) lock."""
    rows = await conn.fetch(
        "SELECT CASE WHEN objsubid = 2 THEN classid::bigint ELSE -1 END AS c,"
        " CASE WHEN objsubid = 2 THEN objid::bigint"
        " ELSE (classid::bigint << 32) | objid::bigint END AS k"
        " FROM pg_locks WHERE locktype = 'advisory' AND pid = $1 AND granted", pid)
    return {(r["c"], r["k"]) for r in rows}


async def test_a_claim_releases_only_the_lock_it_is_told_to(
        database: Database, conn: asyncpg.Connection) -> None:
    """No claim function releases a lock its caller did not name: a session's other advisory
    locks (the migration's, an application's) stay held. (0003 released them all.)"""
    q = db.queries()
    worker = await database.connect()
    try:
        pid = await worker.fetchval("SELECT pg_backend_pid()")
        await worker.execute("SELECT pg_advisory_lock(7461029318)")  # someone else's lock
        await insert_readings(conn, [reading(i) for i in range(4)])
        first = await worker.fetchrow(q["claim"], "w", 2, None, None)
        second = await worker.fetchrow(q["claim"], "w", 2, None, None)
        key = await worker.fetchval("SELECT sp_claim_lock_key($1)", first["claim_id"])
        assert (21328, key) in await _advisory_locks(conn, pid)
        # The first claim is finished: the next call releases its lock, and only that one.
        await worker.fetchrow(q["claim"], "w", 2, None, first["claim_id"])
        await worker.fetchrow(q["take_orphan"], "w", 60.0, None, None, [])
        held = await _advisory_locks(conn, pid)
        assert (21328, key) not in held
        second_key = await worker.fetchval("SELECT sp_claim_lock_key($1)", second["claim_id"])
        assert (21328, second_key) in held
        assert held == {(-1, 7461029318), (21328, second_key)}  # the application's lock stays
        # A lease owner takes no session lock at all.
        await insert_readings(conn, [reading(9)])
        leased = await worker.fetchrow(q["claim"], "w", 2, 5.0, None)
        assert leased["claim_id"] is not None and await _advisory_locks(conn, pid) == held
    finally:
        await worker.close()


async def test_a_worker_of_the_previous_version_holds_one_claim_lock_at_a_time(
        database: Database, conn: asyncpg.Connection) -> None:
    """During a rolling upgrade an old worker claims through 0003's signatures and writes by
    deleting the claim, never unlocking: each call frees its session's previous claim lock
    (50 batches leave one lock, not 50), and only claim locks (an application's stays)."""
    old = await database.connect()
    try:
        pid = await old.fetchval("SELECT pg_backend_pid()")
        await old.execute("SELECT pg_advisory_lock(7461029318)")  # someone else's lock
        await insert_readings(conn, [reading(i) for i in range(50)])
        for _ in range(50):
            c = await old.fetchrow('SELECT claim_id, reading_ids FROM sp_claim($1, 1)', "old")
            await old.execute("DELETE FROM scoring_claims WHERE id = $1", c["claim_id"])
            await old.execute("INSERT INTO predictions (reading_id, cluster_id, model_version)"
                              " SELECT unnest($1::bigint[]), 0, 'v1'", c["reading_ids"])
            await old.fetch("SELECT * FROM sp_take_orphan($1, 60.0)", "old")
        held = await _advisory_locks(conn, pid)
        assert (-1, 7461029318) in held
        assert len(held - {(-1, 7461029318)}) <= 1
        assert await conn.fetchval("SELECT count(*) FROM predictions") == 50
    finally:
        await old.close()


async def test_a_claim_uncommitted_during_an_orphan_look_is_seen_by_the_next_look(
        database: Database, conn: asyncpg.Connection) -> None:
    """The orphan timer's incremental look never moves its mark past a claim still in flight:
    a claim whose transaction was open during one look, and whose owner then dies, is found
    (takeable) by the very next look, within ORPHAN_CHECK_SECONDS, not by the full look."""
    after, known = 0, list[int]()
    found, mark = await find_orphans(conn, after, known, 60.0)
    after, known, _ = next_orphan_look(after, mark, found)
    await insert_readings(conn, [reading(i) for i in range(3)])
    owner = await database.connect()
    try:
        tx = owner.transaction()
        await tx.start()
        claim = await owner.fetchrow("SELECT claim_id FROM sp_claim('owner', 10)")
        assert claim["claim_id"] is not None
        found, mark = await find_orphans(conn, after, known, 60.0)  # the claim is in flight
        after, known, orphans = next_orphan_look(after, mark, found)
        assert not orphans
        await tx.commit()
    finally:
        await owner.close()  # the owner dies: its lock goes
    found, mark = await find_orphans(conn, after, known, 60.0)
    after, known, orphans = next_orphan_look(after, mark, found)
    assert orphans == {claim["claim_id"]}


async def test_a_renewed_lease_is_kept_however_long_the_batch_and_taken_once_it_lapses(
        database: Database, conn: asyncpg.Connection) -> None:
    q = db.queries()
    ids = await insert_readings(conn, [reading(i) for i in range(3)])
    owner = await database.connect()
    try:
        claim = await owner.fetchrow(q["claim"], "owner", 10, 0.3, None)
        assert sorted(claim["reading_ids"]) == ids
        # A batch three leases long, renewed every lease/3: never taken over.
        for _ in range(9):
            await asyncio.sleep(0.1)
            await owner.execute(q["renew_leases"], "owner", 0.3, [claim["claim_id"]])
            assert await conn.fetchrow(q["take_orphan"], "taker", 60.0, 0.3, None, None) is None
        # The owner stops renewing (frozen): taken over once the lease has run out.
        assert await owner.fetchval(q["write_claim"], claim["claim_id"], [], [], [], "1", "r",
                                    "m", [], [], [], [], 1) == 0  # a wrong token writes nothing
        await asyncio.sleep(0.35)
        taken = await conn.fetchrow(q["take_orphan"], "taker", 60.0, 0.3, None, None)
        assert taken["claim_id"] == claim["claim_id"] and taken["token"] == 1
        assert taken["previous_worker"] == "owner" and not taken["locked"]
        # The late owner's results: nothing written, and its renewal moves nothing.
        await owner.execute(q["renew_leases"], "owner", 0.3, [claim["claim_id"]])
        n = len(ids)
        assert await owner.fetchval(q["write_claim"], claim["claim_id"], ids, [0] * n,
                                    [1.0] * n, "1", "r", "m", [], [], [], [0] * n, 0) == 0
        assert await conn.fetchval(q["write_claim"], claim["claim_id"], ids, [0] * n,
                                   [1.0] * n, "1", "r", "m", [], [], [], [0] * n, 1) == 1
        assert await conn.fetchval("SELECT count(*) FROM predictions") == n
    finally:
        await owner.close()
