"""The simulator's writer: the stream of generator.py into PostgreSQL, as the old system's writers
send it (plain multi-row INSERTs), with a failures row per failure episode."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import numpy as np
import structlog

from sensor_predictor import db
from sensor_predictor.config import Settings
from sensor_predictor.model_contract import FEATURE_NAMES
from sensor_predictor.simulator.generator import Simulator

__all__ = ["ConnectionFactory", "machine_name", "run_simulation"]

log = structlog.get_logger("sensor_predictor.simulator")

ConnectionFactory = Callable[[], Awaitable[asyncpg.Connection]]

# Never wake more often than this: at high rates each statement carries more rows instead.
_MIN_TICK_SECONDS = 0.02
_DECIMALS = 6


def machine_name(prefix: str, index: int) -> str:
    """The machines.machine_id of simulated machine `index` (0-based): sim-001, sim-002, ..."""
    return f"{prefix}-{index + 1:03d}"


async def run_simulation(
    target: Settings | ConnectionFactory,
    *,
    machines: int = 10,
    rate: float = 10.0,
    duration: float | None = None,
    count: int | None = None,
    drift: bool = False,
    rows_per_statement: int = 100,
    seed: int | None = None,
    stop: asyncio.Event | None = None,
    record_failures: bool = True,
    machine_prefix: str = "sim",
    progress_seconds: float = 5.0,
) -> int:
    """Write simulated readings at `rate` per second until count, duration or stop; returns the
    number written.

    One plain multi-row INSERT per tick, paced against a monotonic schedule so the average rate
    holds. With record_failures, each failure episode gets a `failures` row (opened when its
    first reading is written, closed at the first reading after it) and its readings carry its
    failure_id.
    """
    if not rate > 0 or math.isinf(rate):
        raise ValueError(f"rate must be a positive finite number, got {rate}")
    if rows_per_statement < 1:
        raise ValueError(f"rows_per_statement must be >= 1, got {rows_per_statement}")
    if count is not None and count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if duration is not None and duration < 0:
        raise ValueError(f"duration must be >= 0, got {duration}")
    total: int | None = count
    if duration is not None:
        # Readings are scheduled at i / rate; those before the end of the duration are due.
        by_duration = math.ceil(duration * rate)
        total = by_duration if total is None else min(total, by_duration)

    conn = await (db.connect(target) if isinstance(target, Settings) else target())
    try:
        writer = _Writer(conn, Simulator(machines, seed, drift), record_failures)
        await writer.register_machines(machine_prefix)
        log.info("simulation_started", machines=machines, rate=rate, duration=duration,
                 count=count, drift=drift, rows_per_statement=rows_per_statement, seed=seed,
                 record_failures=record_failures)
        written = await _pace(writer, rate=rate, total=total, duration=duration,
                              rows_per_statement=rows_per_statement, stop=stop,
                              progress_seconds=progress_seconds)
        await writer.finish()
        return written
    finally:
        await conn.close()


async def _pace(
    writer: _Writer, *, rate: float, total: int | None, duration: float | None,
    rows_per_statement: int, stop: asyncio.Event | None, progress_seconds: float,
) -> int:
    t0 = time.monotonic()
    wall0 = datetime.now(UTC)
    written = 0
    last_tick = -math.inf
    report_at, report_written, report_time = t0 + progress_seconds, 0, t0
    while total is None or written < total:
        if stop is not None and stop.is_set():
            break
        now = time.monotonic()
        # Reading i is due at t0 + i / rate; write every due one (a statement at most).
        due = math.floor((now - t0) * rate) + 1
        if total is not None:
            due = min(due, total)
        n = min(due - written, rows_per_statement)
        if n > 0:
            stamps = [wall0 + timedelta(seconds=(written + i) / rate) for i in range(n)]
            await writer.write(stamps)
            written += n
            last_tick = now
        if duration is not None and now - t0 >= duration:
            break  # time is up, even if a slow database left readings due
        now = time.monotonic()
        if now >= report_at:
            achieved = (written - report_written) / (now - report_time)
            log.info("simulation_progress", written=written, rate=round(achieved, 1),
                     average_rate=round(written / (now - t0), 1), target_rate=rate,
                     open_failures=writer.open_failures)
            await writer.touch_machines()
            report_at, report_written, report_time = now + progress_seconds, written, now
        if due - written > 0:
            continue  # behind schedule: the next statement at once
        wake = max(t0 + written / rate, last_tick + _MIN_TICK_SECONDS)
        await _pause(wake - time.monotonic(), stop)
    elapsed = time.monotonic() - t0
    log.info("simulation_finished", written=written, seconds=round(elapsed, 3),
             average_rate=round(written / elapsed, 1) if elapsed > 0 else None,
             target_rate=rate, episodes=writer.episodes_seen)
    return written


async def _pause(seconds: float, stop: asyncio.Event | None) -> None:
    if seconds <= 0:
        await asyncio.sleep(0)
    elif stop is None:
        await asyncio.sleep(seconds)
    else:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)


class _Writer:
    """Turns simulator blocks into INSERT statements on one connection."""

    def __init__(self, conn: asyncpg.Connection, sim: Simulator, record_failures: bool) -> None:
        self.conn = conn
        self.sim = sim
        self.record_failures = record_failures
        self.machine_ids: list[int] = []
        self._failure_ids: dict[int, int] = {}  # episode number -> failures.id
        self._open: dict[int, int] = {}  # machine index -> episode number of its open failure
        self.episodes_seen = 0

    @property
    def open_failures(self) -> int:
        return len(self._open)

    async def register_machines(self, prefix: str) -> None:
        names = [machine_name(prefix, i) for i in range(self.sim.machines)]
        rows = await self.conn.fetch(db.queries()["sim_register_machines"], names)
        by_name = {r["machine_id"]: int(r["id"]) for r in rows}
        self.machine_ids = [by_name[name] for name in names]

    async def touch_machines(self) -> None:
        await self.conn.execute(db.queries()["sim_touch_machines"], self.machine_ids)

    async def write(self, stamps: list[datetime]) -> None:
        block = self.sim.next_block(len(stamps))
        machines = block.machines.tolist()
        episodes = block.episodes.tolist()
        failure_ids: list[int | None] = [None] * len(stamps)
        closing: list[tuple[int, datetime]] = []
        if self.record_failures:
            for i, (machine, episode) in enumerate(zip(machines, episodes, strict=True)):
                open_episode = self._open.get(machine)
                if open_episode is not None and open_episode != episode:
                    closing.append((self._failure_ids.pop(open_episode), stamps[i]))
                    del self._open[machine]
                if episode < 0:
                    continue
                if episode not in self._failure_ids:
                    self._failure_ids[episode] = await self.conn.fetchval(
                        db.queries()["sim_open_failure"], stamps[i], self.machine_ids[machine])
                    self._open[machine] = episode
                    self.episodes_seen += 1
                failure_ids[i] = self._failure_ids[episode]
        else:
            self.episodes_seen += len({e for e in episodes if e >= 0} - set(self._failure_ids))
        rows = []
        for stamp, row, machine, failure_id in zip(
                stamps, np.round(block.values, _DECIMALS).tolist(), machines, failure_ids,
                strict=True):
            values = json.dumps(dict(zip(FEATURE_NAMES, row, strict=True)))
            rows.append(f"({db.sql_literal(stamp.isoformat())}, {db.sql_literal(values)}, "
                        f"{self.machine_ids[machine]}, "
                        f"{'NULL' if failure_id is None else failure_id})")
        # A plain multi-row INSERT, as the old system's writers send.
        await self.conn.execute(
            db.queries()["sim_insert_readings"].replace("{rows}", ", ".join(rows)))
        if closing:
            await self._close_failures(closing)

    async def _close_failures(self, closing: list[tuple[int, datetime]]) -> None:
        await self.conn.execute(db.queries()["sim_close_failures"],
                                [c[0] for c in closing], [c[1] for c in closing])

    async def finish(self) -> None:
        """Close the failures still open (the simulation stops, so do they) and touch machines."""
        if self._open:
            now = datetime.now(UTC)
            await self._close_failures(
                [(self._failure_ids.pop(e), now) for e in self._open.values()])
            self._open.clear()
        await self.touch_machines()
