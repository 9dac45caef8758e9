"""A migrated template database, created once per server, cloned per test."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import asyncpg

from sensor_predictor.devtools.postgres import PgServer, create_database, drop_database


@dataclass
class Database:
    server: PgServer
    name: str

    def env(self) -> dict[str, str]:
        return self.server.env(self.name)

    async def connect(self) -> asyncpg.Connection:
        return await self.server.connect(self.name)


def create_template(server: PgServer, name: str) -> str:
    """CREATE DATABASE `name` and migrate it (blocking: for session fixtures)."""
    from sensor_predictor.migrate import migrate

    async def setup() -> None:
        await create_database(server, name)
        conn = await server.connect(name)
        try:
            await migrate(conn)
        finally:
            await conn.close()

    asyncio.run(setup())
    return name


def clone(server: PgServer, template: str, prefix: str = "sp_test_") -> Database:
    """A fresh copy of the template (CREATE DATABASE ... TEMPLATE: a file copy, fast)."""
    name = f"{prefix}{uuid.uuid4().hex[:12]}"
    asyncio.run(create_database(server, name, template=template))
    return Database(server, name)


def drop(db: Database) -> None:
    asyncio.run(drop_database(db.server, db.name))
