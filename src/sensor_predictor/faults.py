"""What a failure means, and the supervision of the worker's background tasks (docs/faults.md).

Pure logic apart from the one loop `supervise`: an error is classified by what it says about the
database (gone, busy for a moment, or set up wrong) or about our own code; a background task that
ends for any reason but a shutdown is logged, counted and started again with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import structlog

from sensor_predictor import db

log = structlog.get_logger("sensor_predictor.faults")

UNAVAILABLE = "unavailable"  # the server cannot be reached / the session is gone
TRANSIENT = "transient"  # the server answered "not now": retry soon
CONFIGURATION = "configuration"  # the server answered "never, as set up": retry slowly, loudly
BUG = "bug"  # anything else: ours, or a value we did not foresee

# SQLSTATE classes and codes that pass by themselves: a cancel (pg_cancel_backend, a
# statement_timeout), too many connections, a read-only server (a standby just after a failover,
# default_transaction_read_only), an idle-in-transaction timeout, serialization failures and
# deadlocks, a lock_timeout, a server starting or shutting down, out of memory on the server.
_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.QueryCanceledError, asyncpg.TooManyConnectionsError,
    asyncpg.ReadOnlySQLTransactionError, asyncpg.IdleInTransactionSessionTimeoutError,
    asyncpg.TransactionRollbackError, asyncpg.LockNotAvailableError,
    asyncpg.OperatorInterventionError, asyncpg.InsufficientResourcesError,
)
# An answer that will not change until someone changes the database: a privilege, a missing
# table, function or column (a schema without our migrations under --no-migrate), a login.
_CONFIGURATION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.InsufficientPrivilegeError, asyncpg.UndefinedTableError,
    asyncpg.UndefinedFunctionError, asyncpg.UndefinedColumnError,
    asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidCatalogNameError,
    asyncpg.InvalidSchemaNameError,
)


def classify(exc: BaseException) -> str:
    """UNAVAILABLE, TRANSIENT, CONFIGURATION or BUG."""
    if isinstance(exc, db.UNAVAILABLE):
        return UNAVAILABLE
    if isinstance(exc, _TRANSIENT_ERRORS):
        return TRANSIENT
    if isinstance(exc, _CONFIGURATION_ERRORS):
        return CONFIGURATION
    return BUG


def is_database_fault(exc: BaseException) -> bool:
    """The database said no, or is gone: not a property of the data being scored."""
    return classify(exc) in (UNAVAILABLE, TRANSIENT, CONFIGURATION)


def describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# Restart delays of a supervised task (seconds): the first, and the ceiling they double up to.
# A configuration error starts at the ceiling: it will not pass by itself.
RESTART_BACKOFF = (0.2, 5.0)
# A task that ran this long before it ended starts again at the first delay.
HEALTHY_RUN_SECONDS = 30.0


@dataclass
class TaskHealth:
    """Which supervised tasks are down (ended and not running yet, or failing their checks),
    since when (time.monotonic()), and why."""

    down: dict[str, tuple[float, str]] = field(default_factory=dict)

    def mark_down(self, task: str, why: str) -> None:
        if task not in self.down:
            self.down[task] = (time.monotonic(), why)

    def mark_up(self, task: str) -> None:
        self.down.pop(task, None)

    def report(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        return {task: {"down_s": round(now - since, 1), "error": why}
                for task, (since, why) in sorted(self.down.items())}


async def supervise(name: str, run: Callable[[], Awaitable[Any]], *, stopping: asyncio.Event,
                    health: TaskHealth, on_restart: Callable[[str], None]) -> None:
    """Run `run()` until `stopping` is set, starting it again whenever it ends otherwise:
    every unexpected end is logged with its error, counted (on_restart) and shown as down
    until the task runs again."""
    delay = RESTART_BACKOFF[0]
    while not stopping.is_set():
        started = time.monotonic()
        try:
            await run()
            if stopping.is_set():
                return
            error, kind = "returned", BUG
            log.error("task_ended", task=name, error=error)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if stopping.is_set():
                return
            error, kind = describe(exc), classify(exc)
            log.error("task_failed", task=name, error=error, kind=kind, exc_info=exc)
        health.mark_down(name, error)
        on_restart(name)
        if time.monotonic() - started >= HEALTHY_RUN_SECONDS:
            delay = RESTART_BACKOFF[0]
        if kind == CONFIGURATION:
            delay = RESTART_BACKOFF[1]
        log.info("task_restarting", task=name, in_s=round(delay, 2))
        try:
            await asyncio.wait_for(stopping.wait(), timeout=delay)
            return
        except TimeoutError:
            pass
        health.mark_up(name)
        delay = min(delay * 2, RESTART_BACKOFF[1])


def in_daemon_thread(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    """fn(*args) in a daemon thread of its own: unlike asyncio.to_thread (the default executor,
    joined when the loop closes and again when the interpreter exits), a call that hangs (an
    MLflow fetch from a server that stopped answering) never holds the process's exit up."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def target() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting coroutine
            ok, value = False, exc
        else:
            ok, value = True, result
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(settle, ok, value)

    threading.Thread(target=target, name=f"daemon-{getattr(fn, '__name__', 'call')}",
                     daemon=True).start()
    return future
