"""`sensor-predictor widen-ids`: the integer ids of a database adopted from the old system
(readings.id, predictions.id, predictions.reading_id) widened to bigint online, while the old
consumer and the worker keep writing. The steps and their SQL: sql/widen_ids.sql. Every step
reads its state from the catalog, so an interrupted run is resumed by running it again.

Writers wait only while a lock is held: the prepare step (a column and a trigger added) and the
swap, each one short transaction that gives up after `lock_timeout_ms` when it cannot get its
locks (writers queue behind a waiting ALTER TABLE) and is retried. The backfill, the CHECK and
foreign key validations and the CONCURRENTLY index builds take no lock a writer waits for.

Shared headroom arithmetic for sensor_id_headroom_ratio is here too (pure)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import asyncpg
import structlog

from sensor_predictor import db

log = structlog.get_logger("sensor_predictor.widen_ids")

# Below these shares of the id type still free, a warning is logged (once per crossing).
HEADROOM_WARNINGS = (0.5, 0.1)
LOCK_RETRY_BACKOFF = (0.05, 2.0)


def helpers_sql() -> str:
    return (resources.files("sensor_predictor") / "sql" / "widen_ids.sql").read_text("utf-8")


@dataclass
class WidenReport:
    widened: list[str] = field(default_factory=list)  # "table.column"
    backfilled_rows: int = 0
    lock_retries: int = 0  # locking transactions that gave up on lock_timeout and ran again
    longest_lock_seconds: float = 0.0  # the longest of the locking transactions
    seconds: float = 0.0
    steps: list[str] = field(default_factory=list)


async def _locking(conn: asyncpg.Connection, report: WidenReport, lock_timeout_ms: int,
                   query: str, *args: Any, attempts: int = 100) -> Any:
    """One short transaction that takes table locks: bounded by lock_timeout, retried with
    backoff when the locks did not come in time (or a deadlock chose us)."""
    delay = LOCK_RETRY_BACKOFF[0]
    for attempt in range(1, attempts + 1):
        started = time.monotonic()
        try:
            async with conn.transaction():
                await conn.fetchval(db.queries()["widen_lock_timeout"], f"{lock_timeout_ms}ms")
                value = await conn.fetchval(query, *args)
            report.longest_lock_seconds = max(report.longest_lock_seconds,
                                              time.monotonic() - started)
            return value
        except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError) as exc:
            report.lock_retries += 1
            log.info("widen_ids_lock_retry", attempt=attempt, retry_in_s=round(delay, 2),
                     reason=type(exc).__name__)
            if attempt == attempts:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, LOCK_RETRY_BACKOFF[1])
    raise AssertionError("unreachable")


async def widen_ids(conn: asyncpg.Connection, *, batch_size: int = 20_000,
                    lock_timeout_ms: int = 200, lock_attempts: int = 100) -> WidenReport:
    """Run (or resume) the widening to its end. `conn` must not be in a transaction (the index
    builds are CONCURRENTLY). A locking step that did not get its locks in `lock_attempts`
    tries raises asyncpg.LockNotAvailableError; what was done stays done (run it again)."""
    q = db.queries()
    report = WidenReport()
    started = time.monotonic()
    await conn.execute(helpers_sql())
    try:
        targets = await conn.fetch(q["widen_targets"])
        report.widened = [f"{r['tbl']}.{r['col']}" for r in targets]
        if targets:
            log.info("widen_ids_start", columns=report.widened, batch_size=batch_size,
                     lock_timeout_ms=lock_timeout_ms)
        tables = list(dict.fromkeys(r["tbl"] for r in targets))
        for table in tables:
            await _locking(conn, report, lock_timeout_ms, q["widen_prepare"], table,
                           attempts=lock_attempts)
            report.steps.append(f"prepare {table}")
        for table in tables:
            lo, hi = await conn.fetchrow(q["widen_bounds"], table)
            if lo is None:
                continue
            copied = 0
            t0 = time.monotonic()
            start = lo
            while start <= hi:
                upto, n = await conn.fetchrow(q["widen_backfill"], table, start, batch_size)
                if upto is None:
                    break
                copied += n
                start = upto + 1
            report.backfilled_rows += copied
            log.info("widen_ids_backfilled", table=table, rows=copied,
                     seconds=round(time.monotonic() - t0, 2))
        for _ in range(3):  # validations, then the index copies (again if one was invalid)
            steps = [r["step"] for r in await conn.fetch(q["widen_online_steps"])]
            if not steps:
                break
            for step in steps:
                t0 = time.monotonic()
                await conn.execute(step)
                report.steps.append(step)
                log.info("widen_ids_step", step=step, seconds=round(time.monotonic() - t0, 2))
        if targets:
            swapped = await _locking(conn, report, lock_timeout_ms, q["widen_swap"],
                                     attempts=lock_attempts)
            report.steps.append(f"swap ({swapped} columns)")
            log.info("widen_ids_swapped", columns=report.widened)
        for step in [r["step"] for r in await conn.fetch(q["widen_fk_steps"])]:
            t0 = time.monotonic()
            await conn.execute(step)
            report.steps.append(step)
            log.info("widen_ids_step", step=step, seconds=round(time.monotonic() - t0, 2))
        if targets:
            await conn.execute(q["widen_analyze"])
    finally:
        if not conn.is_closed():
            await conn.execute(q["widen_drop_helpers"])
    report.seconds = time.monotonic() - started
    log.info("widen_ids_done", columns=report.widened or "none (already bigint)",
             seconds=round(report.seconds, 1), rows_backfilled=report.backfilled_rows,
             longest_lock_s=round(report.longest_lock_seconds, 3), lock_retries=report.lock_retries)
    return report


# -- headroom -------------------------------------------------------------------------------------


def headroom(id_max: float, id_used: float) -> float:
    """The share of the id type still free (1.0: nothing used, 0.0: exhausted)."""
    if id_max <= 0:
        return 0.0
    return max(0.0, min(1.0, 1.0 - id_used / id_max))


def crossed(previous: float | None, current: float,
            thresholds: tuple[float, ...] = HEADROOM_WARNINGS) -> float | None:
    """The lowest threshold `current` is below that `previous` was not (None: no new one).
    The first reading (previous None) warns when already below a threshold."""
    below = [t for t in thresholds if current < t and (previous is None or previous >= t)]
    return min(below) if below else None
