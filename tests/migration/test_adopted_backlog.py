"""An adopted backlog (migration 0014): the readings the old predictor left unscored are listed
once, by a pass that `migrate` runs in steps, and handed out from that list; the rows it
scored are never walked again. Driven from SQL (the worker's own claim and write statements)
against a real server, with the old consumer writing one message per transaction throughout."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio

from sensor_predictor import db
from sensor_predictor import migrate as migrate_module
from sensor_predictor.devtools import old_system
from sensor_predictor.devtools.postgres import PgServer, create_database, drop_database
from sensor_predictor.devtools.tally import tally
from sensor_predictor.migrate import migrate
from tests.support.databases import Database
from tests.support.readings import insert_readings, reading

pytestmark = pytest.mark.asyncio

OLD_READINGS = 3_000
TRUTH = """SELECT sp_backlog() AS backlog,
                  (SELECT count(*) FROM readings r
                    WHERE NOT EXISTS (SELECT 1 FROM predictions o WHERE o.reading_id = r.id)
                      AND NOT EXISTS (SELECT 1 FROM reading_errors e
                                       WHERE e.reading_id = r.id)) AS waiting"""


@pytest_asyncio.fixture
async def old_db(pg_server: PgServer) -> AsyncIterator[str]:
    """The old system's database: OLD_READINGS readings, half of those without a failure
    scored by the old predictor (spread over the ids, as it never kept up)."""
    name = f"sp_adopt_{uuid.uuid4().hex[:10]}"
    await create_database(pg_server, name)
    conn = await pg_server.connect(name)
    try:
        await old_system.create_old_schema(conn)
        await old_system.bulk_history(conn, OLD_READINGS)
        await old_system.old_predictions(conn, "1", "old-run-1")
    finally:
        await conn.close()
    yield name
    await drop_database(pg_server, name)


async def _old_rows(conn: asyncpg.Connection) -> str:
    return str(await conn.fetchval(
        "SELECT md5(string_agg(p::text, ',' ORDER BY id)) FROM predictions p"))


async def _claim_and_write(conn: asyncpg.Connection, batch: int) -> int | None:
    """One claim scored the worker's way (write_claim deletes the claim and writes its
    predictions in one statement): how many readings it had; None when nothing is left."""
    q = db.queries()
    row = await conn.fetchrow(q["claim"], "t", batch, 5.0, None)
    if row is None:
        return None
    ids = row["reading_ids"]
    if row["claim_id"] is not None:
        n = len(ids)
        await conn.execute(q["write_claim"], row["claim_id"], ids, [0] * n, [0.5] * n, "9",
                           "run-9", "m", [], [], [], [0] * n, 0)
    return len(ids)


async def _rows_read(table: str, *conns: asyncpg.Connection) -> int:
    """Rows and index entries of `table` read so far, by sequential scans and through any of
    its indexes (each connection's pending counts flushed first)."""
    for c in conns:
        await c.execute("SELECT pg_stat_force_next_flush()")  # flushed once it is idle
    await conns[0].execute("SELECT pg_stat_clear_snapshot()")
    return int(await conns[0].fetchval(
        "SELECT t.seq_tup_read + (SELECT COALESCE(sum(i.idx_tup_read), 0)"
        "   FROM pg_stat_user_indexes i WHERE i.relid = t.relid)"
        "  FROM pg_stat_user_tables t WHERE t.relname = $1", table))


async def _assert_truth(conn: asyncpg.Connection) -> None:
    row = await conn.fetchrow(TRUTH)
    assert row["backlog"] == row["waiting"], dict(row)


@pytest.mark.timeout(60)
async def test_an_adopted_backlog_drains_from_the_list_once_without_reading_the_old_results(
        pg_server: PgServer, old_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The old consumer writes all along; two connections claim and write as lanes do. Every
    reading is scored exactly once, the old predictor's rows stay as they were, sp_backlog()
    is the truth, and the drain reads none of the old predictor's results (before 0014 every
    claim walked them and looked each up)."""
    monkeypatch.setattr(migrate_module, "ADOPT_CHUNK", 700)  # several steps of the pass
    conn = await pg_server.connect(old_db)
    writer = await pg_server.connect(old_db)
    lanes = [await pg_server.connect(old_db) for _ in range(2)]
    stop = asyncio.Event()
    written: list[int] = []

    async def consume() -> None:
        consumer = old_system.Consumer(writer)
        rnd = random.Random(4)
        while not stop.is_set():
            written.append(await consumer.write(f"machine-{rnd.randrange(3)}",
                                                old_system.message(rnd),
                                                has_failure=rnd.random() < 0.1))
            await asyncio.sleep(0.003)

    task = asyncio.create_task(consume())
    try:
        await migrate(conn)
        old = await _old_rows(conn)  # (after migrate: it adds columns)
        assert await conn.fetchval("SELECT upto >= top AND top > 0 FROM scoring_adoption")
        listed = await conn.fetchval("SELECT count(*) FROM scoring_adopted")
        assert listed == await conn.fetchval(
            "SELECT count(*) FROM readings r WHERE r.txid = '0' AND NOT EXISTS"
            " (SELECT 1 FROM predictions o WHERE o.reading_id = r.id)") > 1_000
        await _assert_truth(conn)
        reads0 = await _rows_read("predictions", conn, *lanes)

        async def lane(c: asyncpg.Connection) -> None:
            while await _claim_and_write(c, 100) is not None:
                pass

        await asyncio.gather(*(lane(c) for c in lanes))  # the adopted rows, and what came since
        reads = await _rows_read("predictions", conn, *lanes) - reads0
        await _assert_truth(conn)
        stop.set()
        await task
        await asyncio.gather(*(lane(c) for c in lanes))  # the consumer's last readings
        await _assert_truth(conn)
        t = await tally(conn)
        assert t.exactly_once and t.missing == 0, t
        assert t.readings == OLD_READINGS + len(written) and len(written) > 20
        # The old predictor's rows are untouched (ours are all above its last id).
        last_old = await conn.fetchval("SELECT max(id) FROM predictions WHERE model_version = '1'")
        assert old == await conn.fetchval(
            "SELECT md5(string_agg(p::text, ',' ORDER BY id)) FROM predictions p WHERE id <= $1",
            last_old)
        assert await conn.fetchval(
            "SELECT count(*) FROM predictions WHERE model_version = '9' AND reading_id IN"
            " (SELECT reading_id FROM predictions WHERE model_version = '1')") == 0
        assert reads <= 10, f"the drain read {reads} rows of predictions"
    finally:
        stop.set()
        await task
        for c in (conn, writer, *lanes):
            await c.close()


@pytest.mark.timeout(60)
async def test_a_pass_cut_short_is_not_trusted_and_the_next_migrate_finishes_it(
        pg_server: PgServer, old_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash during the pass: the steps committed before it stay, the step in flight is
    rolled back. Until the list is complete, claims walk as before 0014; the next `migrate`
    (every worker runs one at start) goes on from where the pass stopped; the claims then
    continue from the list where the walk left off. Nothing is handed out twice or missed, and
    sp_backlog() is the truth throughout."""
    async def crashed_before_the_pass(conn: asyncpg.Connection) -> None:
        return None

    conn = await pg_server.connect(old_db)
    try:
        with monkeypatch.context() as m:
            m.setattr(migrate_module, "_list_adopted", crashed_before_the_pass)
            await migrate(conn)
        assert not await conn.fetchval("SELECT sp_adopt_step(400)")  # two steps committed
        assert not await conn.fetchval("SELECT sp_adopt_step(400)")
        doomed = await pg_server.connect(old_db)  # and a third, cut off inside its transaction
        tx = doomed.transaction()
        await tx.start()
        assert not await doomed.fetchval("SELECT sp_adopt_step(400)")
        await conn.execute("SELECT pg_terminate_backend($1)", doomed.get_server_pid())
        doomed.terminate()
        assert await conn.fetchval("SELECT upto FROM scoring_adoption") == 800
        listed = await conn.fetchval("SELECT count(*) FROM scoring_adopted")
        assert 0 < listed == await conn.fetchval(
            "SELECT count(*) FROM readings r WHERE r.txid = '0' AND r.id <= 800 AND NOT EXISTS"
            " (SELECT 1 FROM predictions o WHERE o.reading_id = r.id)")
        await _assert_truth(conn)
        for _ in range(3):  # the walk, as before 0014, while the list is incomplete
            assert await _claim_and_write(conn, 100)
            await _assert_truth(conn)
        before = await conn.fetchval("SELECT reading_id FROM scoring_cursor")
        assert before > 0
        await migrate(conn)  # resumes the pass
        assert await conn.fetchval("SELECT upto >= top FROM scoring_adoption")
        assert await conn.fetchval(
            "SELECT count(*) FROM scoring_adopted") == await conn.fetchval(
            "SELECT count(*) FROM readings r WHERE r.txid = '0' AND NOT EXISTS"
            " (SELECT 1 FROM predictions o WHERE o.reading_id = r.id AND o.model_version = '1')")
        while await _claim_and_write(conn, 100) is not None:
            await _assert_truth(conn)
        t = await tally(conn)
        assert t.exactly_once and t.missing == 0, t
    finally:
        await conn.close()


async def test_the_backlog_count_reads_no_reading_once_caught_up(
        database: Database, conn: asyncpg.Connection) -> None:
    """sp_backlog() (the worker's gauge, every 5 s) costs what waits, not the table: before
    0014, its count of the readings beyond the cursor's snapshot scanned the whole index."""
    await insert_readings(conn, [reading(i) for i in range(3_000)])
    while await _claim_and_write(conn, 1_000) is not None:
        pass
    await conn.execute("ANALYZE readings")  # as autovacuum leaves it
    for _ in range(6):  # as the worker's gauge calls it, one session (plans settle by then)
        before = await _rows_read("readings", conn)
        assert await conn.fetchval("SELECT sp_backlog()") == 0
        reads = await _rows_read("readings", conn) - before
        assert reads <= 10, f"sp_backlog() read {reads} readings"
