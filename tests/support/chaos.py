"""Chaos helpers: a stream writer that survives outages, a freezable TCP proxy, the invariant."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from sensor_predictor.devtools.postgres import PgServer
from sensor_predictor.devtools.tally import Tally, tally
from tests.support.readings import INSERT_READINGS as INSERT
from tests.support.readings import machine_id as _machine_id
from tests.support.readings import reading
from tests.support.waiting import wait_for

# What a writer (or the test) sees while PostgreSQL is going down, down or coming back.
# InternalClientError ("cannot switch to state N; another operation (2) is in progress") is what
# asyncpg raises for a query started between the server's FATAL message and the socket's close.
OUTAGE: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError, asyncpg.AdminShutdownError, asyncpg.InternalClientError,
)

# Pre-rendered good readings: a writer cycles through them (json.dumps per row would cost more
# than the insert itself at a few thousand rows a second).
GOOD_ROWS: list[str] = [json.dumps(reading(i)) for i in range(997)]


async def machine_id(conn: asyncpg.Connection, name: str = "chaos") -> int:
    return await _machine_id(conn, name)


# -- the stream writer ---------------------------------------------------------------------------


@dataclass
class WriterStats:
    committed: int = 0  # rows of statements whose INSERT ... RETURNING answered
    statements: int = 0
    ambiguous: int = 0  # rows of statements cut by an outage: committed or not, nobody knows
    connect_failures: int = 0
    reconnects: int = 0
    # (time.monotonic() of the answer, highest id of the statement), one per statement
    commits: list[tuple[float, int]] = field(default_factory=list)

    @property
    def max_id(self) -> int:
        return self.commits[-1][1] if self.commits else 0

    def first_commit_after(self, moment: float) -> tuple[float, int] | None:
        return next(((t, i) for t, i in self.commits if t >= moment), None)


class StreamWriter:
    """A writer task inserting multi-row statements continuously (like the old writers).

    With `tolerate_outage` it reconnects whenever the server goes away, and counts a statement
    cut by the outage as ambiguous (its commit may or may not have happened).
    """

    def __init__(self, server: PgServer, database: str, *, rows: int = 20, pause: float = 0.01,
                 tolerate_outage: bool = False,
                 row_source: Callable[[int], str | None] | None = None) -> None:
        self.server = server
        self.database = database
        self.rows = rows
        self.pause = pause
        self.tolerate = tolerate_outage
        self.row_source = row_source or (lambda n: GOOD_ROWS[n % len(GOOD_ROWS)])
        self.stats = WriterStats()
        self.ids: list[int] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[WriterStats] | None = None

    def start(self) -> StreamWriter:
        self._task = asyncio.create_task(self._run(), name="stream-writer")
        return self

    async def stop(self) -> WriterStats:
        self._stop.set()
        assert self._task is not None
        return await self._task

    async def __aenter__(self) -> StreamWriter:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is None:
            return
        # A failing test must not leave the task behind; the writer's own error (if any) is
        # not the story then, and stop() already raised it otherwise.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._task), 15)
        if self._task.done() and not self._task.cancelled():
            self._task.exception()

    async def _connect(self) -> tuple[asyncpg.Connection, int]:
        conn = await asyncpg.connect(**self.server.kwargs(self.database), timeout=3)
        return conn, await machine_id(conn)

    async def _run(self) -> WriterStats:
        s = self.stats
        conn: asyncpg.Connection | None = None
        machine = 0
        n = 0
        try:
            while not self._stop.is_set():
                if conn is None:
                    try:
                        conn, machine = await self._connect()
                    except (*OUTAGE, asyncpg.PostgresError):
                        if not self.tolerate:
                            raise
                        s.connect_failures += 1
                        await asyncio.sleep(0.05)
                        continue
                values = [self.row_source(n + i) for i in range(self.rows)]
                try:
                    rows = await conn.fetch(INSERT, values, machine, timeout=10)
                except OUTAGE:
                    if not self.tolerate:
                        raise
                    s.ambiguous += len(values)
                    s.reconnects += 1
                    conn.terminate()
                    conn = None
                    continue
                ids = [r["id"] for r in rows]
                n += len(values)
                s.committed += len(ids)
                s.statements += 1
                s.commits.append((time.monotonic(), max(ids)))
                self.ids.extend(ids)
                if self.pause:
                    await asyncio.sleep(self.pause)
        finally:
            if conn is not None:
                with contextlib.suppress(*OUTAGE):
                    await asyncio.wait_for(conn.close(), 2)
                conn.terminate()
        return s


# -- the invariant -------------------------------------------------------------------------------


MISSING_SQL = """
SELECT count(*) FROM readings r
 WHERE r.id > $1 AND r.id <= $2
   AND NOT EXISTS (SELECT 1 FROM predictions p WHERE p.reading_id = r.id)
   AND NOT EXISTS (SELECT 1 FROM reading_errors e WHERE e.reading_id = r.id)"""


async def unscored(conn: asyncpg.Connection, up_to: int | None = None, above: int = 0) -> int:
    """Readings (id in (above, up_to]) with neither a prediction nor an error yet."""
    return int(await conn.fetchval(MISSING_SQL, above, up_to if up_to is not None else 2**62))


async def settled(conn: asyncpg.Connection) -> bool:
    """Every reading has a result and no claim is outstanding."""
    return await unscored(conn) == 0 and await conn.fetchval(
        "SELECT count(*) FROM scoring_claims") == 0


async def wait_settled(conn: asyncpg.Connection, timeout: float) -> bool:  # noqa: ASYNC109
    return bool(await wait_for(lambda: settled(conn), timeout=timeout, interval=0.05))


@dataclass(frozen=True)
class Outcome:
    tally: Tally
    claims: int
    extra_rows: int  # result rows beyond one per reading

    @property
    def lost(self) -> int:
        return self.tally.missing

    @property
    def duplicated(self) -> int:
        return self.tally.duplicated


async def check_invariant(conn: asyncpg.Connection, served: dict[str, str] | None = None,
                          expected_readings: int | None = None) -> Outcome:
    """The end of every scenario: each reading has exactly one prediction (from a model that was
    served, with that model's run id) or exactly one recorded error, nothing else, and no claim
    is left over. `served` maps model_version -> mlflow_run_id of every model activated."""
    t = await tally(conn)
    claims = int(await conn.fetchval("SELECT count(*) FROM scoring_claims"))
    outcome = Outcome(t, claims, t.prediction_rows + t.error_rows - t.readings)
    assert t.exactly_once, t
    assert outcome.extra_rows == 0, outcome
    assert claims == 0, f"{claims} scoring_claims left over"
    if expected_readings is not None:
        assert t.readings == expected_readings, (t, expected_readings)
    if served is not None:
        pairs = {(r["model_version"], r["mlflow_run_id"]) for r in await conn.fetch(
            "SELECT DISTINCT model_version, mlflow_run_id FROM predictions")}
        assert pairs <= set(served.items()), (pairs, served)
        error_versions = {r[0] for r in await conn.fetch(
            "SELECT DISTINCT model_version FROM reading_errors")}
        assert error_versions <= set(served), (error_versions, served)
    return outcome


# -- a TCP proxy that can stop forwarding without closing anything --------------------------------


class _Pair:
    def __init__(self) -> None:
        self.frozen = False
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: list[asyncio.Task[None]] = []


class FreezableProxy:
    """127.0.0.1:port -> upstream, run on its own event loop in a thread of the test process.

    `freeze()` makes every connection open at that moment stop forwarding in both directions
    while its sockets stay open (a half-open path: a NAT or firewall that dropped its state).
    Connections made afterwards forward normally: a client that reconnects takes a fresh path.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.accepted = 0
        self._pairs: list[_Pair] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chaos-proxy",
                                        daemon=True)
        self._server: asyncio.Server | None = None

    def start(self) -> FreezableProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        pair = _Pair()
        self._pairs.append(pair)
        pair.writers.append(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        pair.writers.append(up_writer)
        pair.tasks = [asyncio.create_task(self._pump(reader, up_writer, pair)),
                      asyncio.create_task(self._pump(up_reader, writer, pair))]

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, pair: _Pair) -> None:
        try:
            while True:
                if pair.frozen:
                    await asyncio.Event().wait()  # never: the bytes stay where they are
                data = await src.read(65536)
                if pair.frozen:
                    await asyncio.Event().wait()
                if not data:
                    break
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if not pair.frozen:
                dst.close()

    def freeze(self) -> int:
        """Freeze every open connection; returns how many were frozen."""
        def go() -> int:
            live = [p for p in self._pairs if not p.frozen and len(p.writers) == 2
                    and not p.writers[0].is_closing()]
            for p in live:
                p.frozen = True
            return len(live)

        return asyncio.run_coroutine_threadsafe(_call(go), self._loop).result(5)

    def close(self) -> None:
        async def shut() -> None:
            if self._server is not None:
                self._server.close()
            for p in self._pairs:
                for t in p.tasks:
                    t.cancel()
                for w in p.writers:
                    w.close()
            for p in self._pairs:
                for t in p.tasks:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t
                for w in p.writers:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(w.wait_closed(), 1)
            if self._server is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._server.wait_closed(), 2)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(15)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()


async def _call(fn: Callable[[], Any]) -> Any:
    return fn()


# -- small things ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


def served(*models: tuple[str, int]) -> dict[str, str]:
    """model_version -> run_id of the given (run_id, version) models, as predictions record
    them: check_invariant's `served`."""
    return {str(version): run_id for run_id, version in models}


# Rows of the report printed at the end of the run (see chaos_fixtures.pytest_terminal_summary).
REPORT: list[dict[str, Any]] = []
