"""Many claimers at once, in SQL: sessions that claim (session locks and leases side by side),
take orphans over, die holding claims, freeze past their lease and write late, and wait on
each other's locks, while writers commit,
abort and hold transactions open in random order. What sp_claim hands out is disjoint and
complete, and exactly one result statement per reading writes (late owners write nothing)."""

from __future__ import annotations

import asyncio
import json
import random

import asyncpg
import pytest

from sensor_predictor import db
from tests.support.databases import Database
from tests.support.readings import machine_id, reading

pytestmark = pytest.mark.asyncio

LEASE = 0.3
INSERT = 'INSERT INTO readings ("values", machine_id) VALUES ($1::jsonb, $2) RETURNING id'


class Claimer:
    def __init__(self, database: Database, name: str, lease: float | None, seed: int) -> None:
        self.database, self.name, self.lease = database, name, lease
        self.rnd = random.Random(seed)
        self.conn: asyncpg.Connection | None = None
        self.held: int | None = None  # the finished claim whose session lock we hold

    async def connect(self) -> asyncpg.Connection:
        if self.conn is None or self.conn.is_closed():
            self.conn = await self.database.connect()
            self.held = None
        return self.conn

    async def die(self) -> None:
        """Gone with whatever it holds: its session ends (session locks go with it); a lease
        is simply never renewed."""
        if self.conn is not None:
            await self.conn.close()
        self.conn = None


async def _write(conn: asyncpg.Connection, claim_id: int, ids: list[int], token: int) -> bool:
    n = len(ids)
    taken = await conn.fetchval(db.queries()["write_claim"], claim_id, ids, [0] * n, [1.0] * n,
                                "1", "run", "m", [], [], [], [0] * n, token)
    return bool(taken)


@pytest.mark.timeout(120)
async def test_concurrent_claimers_hand_out_disjoint_complete_sets_and_write_once(
        database: Database, conn: asyncpg.Connection) -> None:
    q = db.queries()
    machine = await machine_id(conn)
    committed: list[int] = []
    handed: list[int] = []  # by sp_claim
    written: list[int] = []  # by result statements that deleted their claim
    late = taken_over = deaths = 0
    writing = asyncio.Event()
    writing.set()

    async def writer(seed: int) -> None:
        rnd = random.Random(seed)
        c = await database.connect()
        try:
            while writing.is_set():
                tx = c.transaction()
                await tx.start()
                if rnd.random() < 0.3:  # a sequence value before the transaction has an xid
                    await c.fetchval("SELECT nextval('readings_id_seq')")
                ids = [await c.fetchval(INSERT, json.dumps(reading(rnd.randrange(99))), machine)
                       for _ in range(rnd.randint(1, 6))]
                await asyncio.sleep(rnd.uniform(0, 0.02))  # open across claims
                if rnd.random() < 0.15:
                    await tx.rollback()
                else:
                    await tx.commit()
                    committed.extend(ids)
        finally:
            await c.close()

    async def claimer(cl: Claimer) -> None:
        nonlocal late, taken_over, deaths
        idle_rounds = 0
        while writing.is_set() or idle_rounds < 40:
            c = await cl.connect()
            if cl.rnd.random() < 0.25:
                row = await c.fetchrow(q["take_orphan"], cl.name, 60.0, cl.lease, cl.held, None)
                cl.held = None
                if row is None:
                    idle_rounds += 1
                    await asyncio.sleep(0.01)
                    continue
                claim_id, ids, token, locked = (row["claim_id"], list(row["reading_ids"]),
                                                row["token"], row["locked"])
                taken_over += 1
            else:
                row = await c.fetchrow(q["claim"], cl.name, cl.rnd.choice([1, 3, 10]), cl.lease,
                                       cl.held)
                cl.held = None
                if row is None or row["claim_id"] is None:
                    idle_rounds += 1 if row is None else 0
                    await asyncio.sleep(0.002)
                    continue
                claim_id, ids, token = row["claim_id"], list(row["reading_ids"]), 0
                locked = cl.lease is None
                handed.extend(ids)
            idle_rounds = 0
            if cl.rnd.random() < 0.08:
                await cl.die()  # with the claim
                deaths += 1
                continue
            if cl.lease is not None and cl.rnd.random() < 0.08:
                await asyncio.sleep(LEASE * 2)  # frozen past its lease: others take it over
            else:
                await asyncio.sleep(cl.rnd.uniform(0, 0.01))
            if await _write(c, claim_id, ids, token):
                written.extend(ids)
            else:
                late += 1
            if locked:
                cl.held = claim_id

    claimers = [Claimer(database, f"c{i}", None if i % 2 else LEASE, i) for i in range(6)]
    tasks = [asyncio.create_task(claimer(cl)) for cl in claimers]
    writers = [asyncio.create_task(writer(100 + i)) for i in range(3)]
    await asyncio.sleep(5)
    writing.clear()
    await asyncio.gather(*writers)
    await asyncio.gather(*tasks)
    for cl in claimers:
        await cl.die()
    # Whatever the dead left behind (leases about to expire), taken over and written.
    while (row := await conn.fetchrow(q["take_orphan"], "final", 60.0, LEASE, None, None)) or \
            await conn.fetchval("SELECT count(*) FROM scoring_claims"):
        if row is None:
            await asyncio.sleep(0.05)
            continue
        assert await _write(conn, row["claim_id"], list(row["reading_ids"]), row["token"])
        written.extend(row["reading_ids"])
        taken_over += 1
    assert len(committed) > 100
    assert len(handed) == len(set(handed)), "sp_claim handed a reading out twice"
    assert sorted(handed) == sorted(committed)
    assert len(written) == len(set(written)), "a reading was written twice"
    assert sorted(written) == sorted(committed)
    assert await conn.fetchval("SELECT sp_backlog()") == 0
    assert await conn.fetchval("SELECT count(*) FROM predictions") == len(committed)
    assert taken_over > 0 and deaths > 0 and late > 0
    print(f"committed {len(committed)}, claims taken over {taken_over}, deaths {deaths}, "
          f"late results {late}")
