"""Several hosts: each gets a bounded connect time (a host that accepts and never answers does
not use up the budget), and target_session_attrs=read-write skips a read-only server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio

from sensor_predictor import db
from sensor_predictor.config import load_settings
from sensor_predictor.connect_errors import ConnectFailed
from tests.support.databases import Database

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def silent_port() -> AsyncIterator[int]:
    """A TCP port that accepts connections and never says a word (a host gone half-dead)."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    for w in held:
        w.close()
    server.close()


async def test_a_silent_first_host_costs_one_connect_timeout(
        database: Database, silent_port: int) -> None:
    env = database.env()
    settings = load_settings({**env, "POSTGRES_HOST": f"127.0.0.1,{env['POSTGRES_HOST']}",
                              "POSTGRES_PORT": f"{silent_port},{env['POSTGRES_PORT']}",
                              "POSTGRES_CONNECT_TIMEOUT": "1"})
    started = time.monotonic()
    conn = await db.connect(settings)
    took = time.monotonic() - started
    try:
        assert await conn.fetchval("SELECT current_database()") == database.name
    finally:
        await conn.close()
    assert 0.9 <= took < 3, took


async def test_read_write_skips_a_read_only_server(database: Database,
                                                   conn: asyncpg.Connection) -> None:
    await conn.execute(f'ALTER DATABASE "{database.name}" SET default_transaction_read_only = on')
    env = database.env()
    both = {**env, "POSTGRES_HOST": f"{env['POSTGRES_HOST']},{env['POSTGRES_HOST']}"}
    with pytest.raises(ConnectFailed) as failed:
        await db.connect(load_settings(both))
    assert failed.value.cause.kind == "not_primary" and failed.value.cause.transient
    assert len(failed.value.tried) == 2
    anyone = await db.connect(load_settings({**both, "POSTGRES_TARGET_SESSION_ATTRS": "any"}))
    await anyone.close()
    await conn.execute(f'ALTER DATABASE "{database.name}" RESET default_transaction_read_only')
