"""A migrated template database, created once per server, cloned per test."""

from __future__ import annotations

import asyncio
import threading
import uuid
from dataclasses import dataclass, field

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


@dataclass
class Dropper:
    """Drops the databases tests are done with in a thread of its own, while the next tests
    run, and those that wait together at once. A DROP DATABASE makes PostgreSQL take an
    immediate checkpoint and wait for it (so that the checkpointer forgets the database's
    files): 1-1.7 s each on our shared 2-core machine's fsync'ed server, one after the other,
    against 0.02-0.16 s each when ten are dropped at once (they share a checkpoint). Names are
    unique, so no test can meet a database that is still being dropped."""

    batch: int = 16  # connections at once, at most
    _pending: list[Database] = field(default_factory=list)
    _errors: list[str] = field(default_factory=list)
    _wake: threading.Condition = field(default_factory=threading.Condition)
    _closing: bool = False
    _thread: threading.Thread | None = None

    def drop(self, db: Database) -> None:
        with self._wake:
            self._pending.append(db)
            self._wake.notify()
            if self._thread is None:
                # A daemon: a run cut short (Ctrl-C) does not wait for it; finish() does.
                self._thread = threading.Thread(target=self._run, name="drop-databases",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._closing:
                    self._wake.wait()
                if not self._pending:
                    return
                dbs, self._pending = self._pending[:self.batch], self._pending[self.batch:]
            asyncio.run(self._drop_all(dbs))

    async def _drop_all(self, dbs: list[Database]) -> None:
        results = await asyncio.gather(*(drop_database(db.server, db.name) for db in dbs),
                                       return_exceptions=True)
        self._errors.extend(f"{db.name}: {result!r}" for db, result in zip(dbs, results,
                                                                             strict=True)
                            if isinstance(result, BaseException))

    def finish(self, timeout: float = 300) -> None:
        """Wait until every database handed over is dropped (before its server stops); a
        drop that failed is an error of the run."""
        with self._wake:
            self._closing = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._wake:
            self._thread, self._closing = None, False
            errors, self._errors = self._errors, []
        assert not errors, f"databases not dropped: {errors}"


# The databases of the run's server (pg_server), dropped beside the tests that follow;
# pg_server's teardown waits for the last of them (finish).
DROPPER = Dropper()


def drop_later(server: PgServer, name: str) -> None:
    """DROP DATABASE `name` beside the tests that follow (see Dropper)."""
    DROPPER.drop(Database(server, name))
