"""The dedicated LISTEN connection: wake-ups, a heartbeat, and reconnection with backoff."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog

from sensor_predictor import db
from sensor_predictor.config import Settings

log = structlog.get_logger("sensor_predictor.listener")

READINGS_CHANNEL = "sensor_readings"
MODEL_CHANNEL = "sensor_model"


class Listener:
    """Keeps one connection LISTENing (pooled connections drop LISTEN when released).

    A heartbeat query with a timeout notices a connection that died without closing (a half-open
    socket); every (re)connect calls `on_connected`, so the worker catches up on whatever was
    notified while nobody listened.
    """

    def __init__(
        self,
        settings: Settings,
        on_readings: Callable[[], None],
        on_model: Callable[[], None],
        on_connected: Callable[[bool], None],
        on_lost: Callable[[], None],
    ) -> None:
        self._settings = settings
        self._on_readings = on_readings
        self._on_model = on_model
        self._on_connected = on_connected
        self._on_lost = on_lost
        self.listening = False

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
            try:
                conn = await db.connect(
                    self._settings, timeout=max(2.0, self._settings.heartbeat_seconds),
                    server_settings={"application_name": "sensor-predictor-listener"})
                conn.add_termination_listener(lambda _c, ev=lost: ev.set())
                await conn.add_listener(READINGS_CHANNEL, self._notified)
                await conn.add_listener(MODEL_CHANNEL, self._notified)
                self.listening = True
                backoff = 0.1
                log.info("listening", channels=[READINGS_CHANNEL, MODEL_CHANNEL],
                         reconnected=not first)
                self._on_connected(first)
                first = False
                await self._heartbeat(conn, lost)
            except asyncio.CancelledError:
                raise
            except (*db.UNAVAILABLE, asyncpg.PostgresError) as exc:
                if self.listening or first:
                    log.warning("listener_connection_failed", error=_describe(exc),
                                retry_in_s=backoff)
            finally:
                was_listening = self.listening
                self.listening = False
                if conn is not None:
                    conn.terminate()  # never waits on a socket that may be dead
                if was_listening:
                    self._on_lost()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _heartbeat(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        interval = self._settings.heartbeat_seconds
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(lost.wait(), timeout=interval)
            if lost.is_set() or conn.is_closed():
                raise ConnectionError("the listen connection was closed")
            try:
                await asyncio.wait_for(conn.fetchval(db.queries()["heartbeat"]), timeout=interval)
            except TimeoutError:
                raise ConnectionError(
                    f"heartbeat got no answer in {interval:g} s (half-open connection?)"
                ) from None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
