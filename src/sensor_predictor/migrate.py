"""Apply the numbered SQL files under migrations/ in order, once each, under an advisory lock.

A file runs in one transaction with a short lock_timeout, retried with backoff: on a database
in use (the old system's consumer keeps writing while we adopt its tables) a writer waits at most
that long behind a migration, and a migration never queues everyone behind a lock someone else
holds. A file whose first line is `-- migrate: no-transaction` runs statement by statement
outside a transaction, for CREATE INDEX CONCURRENTLY.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import asyncpg
import structlog

from sensor_predictor import db

log = structlog.get_logger("sensor_predictor.migrate")

# Any constant works as long as nothing else in the database uses it for another purpose.
MIGRATION_LOCK_KEY = 7_461_029_318
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_NO_TRANSACTION = "-- migrate: no-transaction"
_CONCURRENT_INDEX = re.compile(
    r"CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+IF\s+NOT\s+EXISTS\s+(\w+)", re.IGNORECASE)
# How long a statement may wait for a table lock before the attempt is given up and retried.
LOCK_TIMEOUT_MS = 500
LOCK_RETRY_SECONDS = 120.0

class MigrationError(Exception):
    """A migration could not be applied; the message says which and why."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def transactional(self) -> bool:
        return not self.sql.lstrip().startswith(_NO_TRANSACTION)

    def statements(self) -> list[str]:
        """A no-transaction file's statements: each ends with `;` at the end of a line."""
        body = "\n".join(ln for ln in self.sql.splitlines() if not ln.lstrip().startswith("--"))
        return [s.strip() for s in re.split(r";\s*$", body, flags=re.MULTILINE) if s.strip()]


def migrations_dir() -> Path:
    """The migrations shipped in the wheel, or the repository's top-level folder in a checkout."""
    packaged = resources.files("sensor_predictor") / "migrations"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "migrations"


def load_migrations(folder: Path | None = None) -> list[Migration]:
    folder = folder or migrations_dir()
    found: list[Migration] = []
    for path in sorted(folder.iterdir()):
        if path.suffix != ".sql":
            continue
        match = _FILE_NAME.match(path.name)
        if not match:
            raise ValueError(f"migration file {path.name!r} is not named NNNN_name.sql")
        found.append(Migration(int(match[1]), match[2], path.read_text(encoding="utf-8")))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"two migration files share a number in {folder}")
    return found


async def migrate(conn: asyncpg.Connection, folder: Path | None = None) -> list[int]:
    """Apply pending migrations; returns the versions applied (empty when up to date)."""
    pending_all = load_migrations(folder)
    q = db.queries()
    await _lock(conn)
    try:
        await conn.execute(q["migration_ledger_create"])
        done = {r["version"] for r in await conn.fetch(q["migrations_applied"])}
        adopting = not done and await conn.fetchval(q["readings_table_exists"])
        if adopting:
            rows = await conn.fetchval(q["readings_estimate"])
            log.info("adopting_existing_tables", readings_estimate=max(int(rows), 0),
                     note="tables made by the old system: kept, with their rows and ids")
        applied: list[int] = []
        for migration in pending_all:
            if migration.version in done:
                continue
            started = time.perf_counter()
            if migration.transactional:
                await _apply_in_transaction(conn, migration)
            else:
                await _apply_statements(conn, migration)
            log.info("migration_applied", version=migration.version, name=migration.name,
                     ms=round((time.perf_counter() - started) * 1000, 1))
            applied.append(migration.version)
        if not applied:
            log.info("migrations_up_to_date", version=max(done, default=0))
        return applied
    finally:
        await conn.execute(q["migration_unlock"], MIGRATION_LOCK_KEY)


async def _lock(conn: asyncpg.Connection) -> None:
    """A session lock, so two replicas starting together apply each file once: the second waits,
    then finds nothing left to do. It waits by polling, with no statement open: CREATE INDEX
    CONCURRENTLY waits for every statement that holds a snapshot, and a pg_advisory_lock()
    blocked behind the migration would be one (a deadlock)."""
    delay = 0.05
    while not await conn.fetchval(db.queries()["migration_lock_try"], MIGRATION_LOCK_KEY):
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)


async def _apply_in_transaction(conn: asyncpg.Connection, migration: Migration) -> None:
    deadline = time.monotonic() + LOCK_RETRY_SECONDS
    delay = 0.05
    attempt = 0
    while True:
        attempt += 1
        try:
            async with conn.transaction():
                await conn.execute(db.queries()["migration_lock_timeout"], f"{LOCK_TIMEOUT_MS}ms")
                await conn.execute(migration.sql)
                await _record(conn, migration)
            return
        except asyncpg.LockNotAvailableError as exc:
            if time.monotonic() + delay > deadline:
                raise MigrationError(
                    f"migration {migration.version:04d}_{migration.name} could not lock its "
                    f"tables in {LOCK_RETRY_SECONDS:.0f} s ({attempt} attempts): a transaction "
                    "holds a lock on them (see pg_locks / pg_stat_activity)") from exc
            log.info("migration_lock_busy", version=migration.version, attempt=attempt,
                     retry_in_s=round(delay, 3))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def _apply_statements(conn: asyncpg.Connection, migration: Migration) -> None:
    # CREATE INDEX CONCURRENTLY waits for writers by itself and never blocks them.
    for statement in migration.statements():
        index = _CONCURRENT_INDEX.search(statement)
        if index is not None:
            await _drop_if_invalid(conn, index[1])
        await conn.execute(statement)
    await _record(conn, migration)


async def _drop_if_invalid(conn: asyncpg.Connection, name: str) -> None:
    """An index left invalid by an interrupted CONCURRENTLY build is dropped and built again."""
    invalid = await conn.fetchval(db.queries()["index_is_invalid"], name)
    if invalid:
        log.warning("invalid_index_rebuilt", index=name)
        quoted = '"' + name.replace('"', '""') + '"'
        await conn.execute(db.queries()["drop_index_concurrently"].replace("{index}", quoted))


async def _record(conn: asyncpg.Connection, migration: Migration) -> None:
    await conn.execute(db.queries()["migration_record"], migration.version, migration.name)
