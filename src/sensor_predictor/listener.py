"""The dedicated LISTEN connection: wake-ups, a heartbeat that proves it listens, and
reconnection with backoff."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog

from sensor_predictor import connect_errors, db
from sensor_predictor.config import Settings
from sensor_predictor.connect_errors import Cause

log = structlog.get_logger("sensor_predictor.listener")

READINGS_CHANNEL = "sensor_readings"
MODEL_CHANNEL = "sensor_model"
CHANNELS = (READINGS_CHANNEL, MODEL_CHANNEL)
# A configuration error (a refused login, a TLS failure) does not heal in a second: retried
# with a backoff up to this, logged once per retry.
CONFIG_BACKOFF_CEILING = 30.0


class ListenerDeaf(ConnectionError):
    """The listen connection is open and answers, but its server session does not listen."""


def deafness(channels: list[str], pid: int, first_pid: int) -> str | None:
    """Why a heartbeat's answer shows a deaf session (None: it listens)."""
    missing = [c for c in CHANNELS if c not in channels]
    if missing:
        return (f"the listen connection's server session does not listen on {', '.join(missing)}"
                " (a transaction-mode pooler between us and the server, or a server restarted "
                "behind a pooler)")
    if pid != first_pid:
        return (f"the listen connection's statements ran on server session {pid}, its LISTEN on "
                f"{first_pid}: a transaction-mode pooler hands each statement to another session")
    return None


class Listener:
    """Keeps one connection LISTENing (pooled connections drop LISTEN when released).

    The heartbeat asks the server session itself whether it listens (pg_listening_channels(),
    and the same pid as when LISTEN ran), with a timeout for a half-open socket: a deaf listener
    is found at the next heartbeat, logged with the reason, counted (`on_deaf`) and reconnected.
    Every (re)connect calls `on_connected`, so the worker catches up on whatever was notified
    while nobody listened.
    """

    def __init__(
        self,
        settings: Settings,
        on_readings: Callable[[], None],
        on_model: Callable[[], None],
        on_connected: Callable[[bool], None],
        on_lost: Callable[[], None],
        on_deaf: Callable[[str], None] | None = None,
    ) -> None:
        self._settings = settings
        self._on_readings = on_readings
        self._on_model = on_model
        self._on_connected = on_connected
        self._on_lost = on_lost
        self._on_deaf = on_deaf
        self.listening = False
        # What keeps it from listening now, for /ready (None while it listens).
        self.problem: Cause | None = Cause("connecting", True, "not connected yet")

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        if channel == READINGS_CHANNEL:
            self._on_readings()
        elif channel == MODEL_CHANNEL:
            self._on_model()

    async def run(self) -> None:
        """Listen until cancelled, reconnecting whenever the connection is lost."""
        backoff = 0.1
        first = True
        while True:
            conn: asyncpg.Connection | None = None
            lost = asyncio.Event()
            ceiling = 1.0
            try:
                conn = await db.connect(
                    self._settings, listen=True,
                    timeout=max(2.0, self._settings.heartbeat_seconds),
                    application_name="sensor-predictor-listener",
                    # One statement per heartbeat: no prepared statement to lose to a pooler
                    # (its deafness is then what the heartbeat reports, not a missing statement).
                    statement_cache_size=0)
                conn.add_termination_listener(lambda _c, ev=lost: ev.set())
                for channel in CHANNELS:
                    await conn.add_listener(channel, self._notified)
                first_pid = await self._check(conn, None)
                self.listening = True
                self.problem = None
                backoff = 0.1
                log.info("listening", channels=list(CHANNELS), reconnected=not first,
                         encrypted=db.is_encrypted(conn))
                self._on_connected(first)
                first = False
                await self._heartbeat(conn, lost, first_pid)
            except asyncio.CancelledError:
                raise
            except ListenerDeaf as exc:
                self.problem = Cause("listener_deaf", True, str(exc))
                if self._on_deaf is not None:
                    self._on_deaf(str(exc))
                log.error("listener_deaf", reason=str(exc), retry_in_s=backoff)
            except (*db.UNAVAILABLE, asyncpg.PostgresError) as exc:
                cause = connect_errors.classify(exc)
                self.problem = cause
                if not cause.transient:
                    ceiling = CONFIG_BACKOFF_CEILING
                    log.error("listener_misconfigured", cause=cause.kind, error=cause.line(),
                              retry_in_s=backoff)
                elif self.listening or first:
                    log.warning("listener_connection_failed", cause=cause.kind,
                                error=_describe(exc), retry_in_s=backoff)
            finally:
                was_listening = self.listening
                self.listening = False
                if conn is not None:
                    conn.terminate()  # never waits on a socket that may be dead
                if was_listening:
                    self._on_lost()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, ceiling)

    async def _check(self, conn: asyncpg.Connection, first_pid: int | None) -> int:
        """One heartbeat: an answer within the interval, from a session that listens."""
        interval = self._settings.heartbeat_seconds
        try:
            row = await asyncio.wait_for(conn.fetchrow(db.queries()["heartbeat"]),
                                         timeout=interval)
        except TimeoutError:
            raise ConnectionError(
                f"heartbeat got no answer in {interval:g} s (half-open connection?)") from None
        assert row is not None
        pid = int(row["pid"])
        reason = deafness(list(row["channels"]), pid, pid if first_pid is None else first_pid)
        if reason is not None:
            raise ListenerDeaf(reason)
        return pid

    async def _heartbeat(self, conn: asyncpg.Connection, lost: asyncio.Event,
                         first_pid: int) -> None:
        interval = self._settings.heartbeat_seconds
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(lost.wait(), timeout=interval)
            if lost.is_set() or conn.is_closed():
                raise ConnectionError("the listen connection was closed")
            await self._check(conn, first_pid)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
