"""Apply the numbered SQL files under migrations/ in order, once each, under an advisory lock.

A file runs in one transaction with a short lock_timeout, retried with backoff: on a database
in use (the old system's consumer keeps writing while we adopt its tables) a writer waits at most
that long behind a migration, and a migration never queues everyone behind a lock someone else
holds. A file whose first line is `-- migrate: no-transaction` runs statement by statement
outside a transaction, for CREATE INDEX CONCURRENTLY.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Awaitable, Callable
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
# Migration 0014's pass: reading ids looked at per transaction (about 50 ms on this machine).
ADOPT_CHUNK = 50_000
# How often a wait (for the migration lock, for an index build) says who it waits for.
WAIT_LOG_SECONDS = 3.0

SideConnection = Callable[[], Awaitable[asyncpg.Connection]]


class MigrationError(Exception):
    """A migration could not be applied; the message says which and why, `reason` in a word."""

    def __init__(self, message: str, reason: str = "migration_failed") -> None:
        super().__init__(message)
        self.reason = reason


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


async def migrate(conn: asyncpg.Connection, folder: Path | None = None, *,
                  lock_wait_seconds: float | None = None,
                  side_connection: SideConnection | None = None) -> list[int]:
    """Apply pending migrations; returns the versions applied (empty when up to date).

    `lock_wait_seconds`: how long to wait for another session's migration before giving up
    (MigrationError, reason "migration_lock_timeout"); a wait ends early, with nothing applied,
    once that session has applied every migration shipped here. `side_connection`: opens a
    second connection, to say every WAIT_LOG_SECONDS who an index build waits for.
    Cancelling the task stops it at once; the next run resumes (an index left invalid by a
    cancelled build is dropped and built again)."""
    pending_all = load_migrations(folder)
    q = db.queries()
    if not await _lock(conn, {m.version for m in pending_all}, lock_wait_seconds):
        return []
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
                await _apply_statements(conn, migration, side_connection)
            log.info("migration_applied", version=migration.version, name=migration.name,
                     ms=round((time.perf_counter() - started) * 1000, 1))
            applied.append(migration.version)
        if not applied:
            log.info("migrations_up_to_date", version=max(done, default=0))
        await _list_adopted(conn)
        return applied
    finally:
        # Cancelled (a stop during a statement): the session ends with the caller's connection,
        # and its lock with it.
        with contextlib.suppress(Exception):
            await conn.execute(q["migration_unlock"], MIGRATION_LOCK_KEY)


async def _list_adopted(conn: asyncpg.Connection) -> None:
    """Migration 0014's one-time pass over an adopted database: the adopted rows that still wait
    are listed, ADOPT_CHUNK ids a transaction (each step its own, so the pass is online and a
    crash loses one step at most: the next migrate goes on from where it stopped). Claims walk
    as before until the list is complete. Once it is, each call is one cheap statement."""
    q = db.queries()
    if not await conn.fetchval(q["adopt_pending"]):
        return  # done (or a folder of migrations without 0014)
    started = time.perf_counter()
    steps = 0
    try:
        while not await conn.fetchval(q["adopt_step"], ADOPT_CHUNK):
            steps += 1
    except asyncpg.InsufficientPrivilegeError as exc:
        # A role that may not run the pass (the worker's own): claims walk the adopted rows as
        # before 0014 until a `migrate` by the schema's owner completes it. Nothing is lost.
        log.warning("adopted_rows_not_listed", error=str(exc),
                    note="run `sensor-predictor migrate` as the schema owner to finish the pass")
        return
    log.info("adopted_rows_listed", steps=steps + 1,
             ms=round((time.perf_counter() - started) * 1000, 1))


async def _lock(conn: asyncpg.Connection, shipped: set[int], wait_seconds: float | None
                ) -> bool:
    """A session lock, so two replicas starting together apply each file once: the second waits,
    then finds nothing left to do. It waits by polling, with no statement open: CREATE INDEX
    CONCURRENTLY waits for every statement that holds a snapshot, and a pg_advisory_lock()
    blocked behind the migration would be one (a deadlock).

    True once locked; False when the schema became complete meanwhile (nothing to do: serve)."""
    q = db.queries()
    delay = 0.05
    started = time.monotonic()
    next_log = started + WAIT_LOG_SECONDS
    while not await conn.fetchval(q["migration_lock_try"], MIGRATION_LOCK_KEY):
        if shipped and shipped <= await _applied(conn):
            log.info("migrations_applied_elsewhere", version=max(shipped),
                     waited_s=round(time.monotonic() - started, 1))
            return False
        now = time.monotonic()
        holder = None
        if now >= next_log or (wait_seconds is not None and now - started >= wait_seconds):
            row = await conn.fetchrow(q["migration_lock_holder"], MIGRATION_LOCK_KEY)
            holder = dict(row) if row is not None else None
        if now >= next_log:
            log.warning("migration_lock_wait", waited_s=round(now - started, 1),
                        holder=_jsonable(holder))
            next_log = now + WAIT_LOG_SECONDS
        if wait_seconds is not None and now - started >= wait_seconds:
            raise MigrationError(
                f"gave up waiting for the migration lock after {wait_seconds:.0f} s: another "
                f"session migrates (holder: {_jsonable(holder)}); see pg_stat_activity",
                reason="migration_lock_timeout")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)
    return True


async def _applied(conn: asyncpg.Connection) -> set[int]:
    try:
        return {r["version"] for r in await conn.fetch(db.queries()["migrations_applied"])}
    except asyncpg.UndefinedTableError:  # no ledger yet
        return set()


def _jsonable(row: dict[str, object] | None) -> dict[str, object] | None:
    if row is None:
        return None
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}


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


async def _apply_statements(conn: asyncpg.Connection, migration: Migration,
                            side_connection: SideConnection | None = None) -> None:
    # CREATE INDEX CONCURRENTLY waits for writers by itself and never blocks them; it also waits
    # for every transaction that holds a snapshot (an ORM session idle in a transaction): while
    # it waits, who it waits for is logged every WAIT_LOG_SECONDS.
    for statement in migration.statements():
        index = _CONCURRENT_INDEX.search(statement)
        if index is None:
            await conn.execute(statement)
            continue
        await _drop_if_invalid(conn, index[1])
        build = asyncio.ensure_future(conn.execute(statement))
        watch = (asyncio.ensure_future(_watch_build(conn.get_server_pid(), index[1], migration,
                                                    side_connection))
                 if side_connection is not None else None)
        try:
            await build
        finally:
            build.cancel()
            if watch is not None:
                watch.cancel()
                with contextlib.suppress(BaseException):
                    await watch
    await _record(conn, migration)


async def _watch_build(pid: int, index: str, migration: Migration,
                       side_connection: SideConnection) -> None:
    """Every WAIT_LOG_SECONDS while the build of `index` (backend `pid`) runs: the sessions it
    waits for (pg_blocking_pids: their state and transaction start)."""
    started = time.monotonic()
    await asyncio.sleep(WAIT_LOG_SECONDS)
    conn: asyncpg.Connection | None = None
    try:
        conn = await side_connection()
        while True:
            rows = await conn.fetch(db.queries()["index_build_blockers"], pid)
            phase = await conn.fetchval(db.queries()["index_build_phase"], pid)
            log.warning("index_build_waiting", version=migration.version, index=index,
                        waited_s=round(time.monotonic() - started, 1), phase=phase,
                        blockers=[_jsonable(dict(r)) for r in rows],
                        note="CREATE INDEX CONCURRENTLY waits for these transactions to end")
            await asyncio.sleep(WAIT_LOG_SECONDS)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # only a log line is lost
        log.info("index_build_watch_failed", error=f"{type(exc).__name__}: {exc}")
    finally:
        if conn is not None:
            conn.terminate()


async def _drop_if_invalid(conn: asyncpg.Connection, name: str) -> None:
    """An index left invalid by an interrupted CONCURRENTLY build is dropped and built again."""
    invalid = await conn.fetchval(db.queries()["index_is_invalid"], name)
    if invalid:
        log.warning("invalid_index_rebuilt", index=name)
        quoted = '"' + name.replace('"', '""') + '"'
        await conn.execute(db.queries()["drop_index_concurrently"].replace("{index}", quoted))


async def _record(conn: asyncpg.Connection, migration: Migration) -> None:
    await conn.execute(db.queries()["migration_record"], migration.version, migration.name)
