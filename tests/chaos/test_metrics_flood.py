"""The metrics endpoint under abuse while the worker scores: idle connections beyond the cap,
clients that pipeline requests and never read, oversize heads and garbage bytes, all on
loopback and bounded in count and time. Scoring goes on, /metrics answers a well-behaved
client, and the worker's database sessions, terminated in the middle of the flood, come back.

The worker runs with a file-descriptor limit of 256 (prlimit on its pid): without the cap on
clients, the 300 idle connections alone would take every descriptor, and its reconnection
would fail with EMFILE, as issue 20 measured (19,990 connections at the default limit).
Uses the shared PostgreSQL server, not the chaos tier's cluster: it only ends the sessions of
its own database."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import time
import urllib.error
import urllib.request

import asyncpg
import pytest

from sensor_predictor.devtools.tally import tally
from sensor_predictor.metrics import HTTP_MAX_CLIENTS
from sensor_predictor.simulator import Simulator
from sensor_predictor.training import activate_model
from tests.support.databases import Database
from tests.support.fixtures import WorkerFactory
from tests.support.models import Models
from tests.support.readings import insert_readings
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

FD_LIMIT = 256
IDLE = 300        # connections that never finish a request head
PIPELINERS = 40   # clients that send 200 requests and never read an answer
OVERSIZE = 30     # request heads of 20 KB
GARBAGE = 30      # random bytes (half of them ending like a head)
FLOOD_SECONDS = 6.0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _connect(port: int, rcvbuf: int | None = None) -> socket.socket | None:
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(3)
    try:
        s.connect(("127.0.0.1", port))
    except OSError:
        s.close()
        return None
    return s


def _flood(port: int) -> list[socket.socket]:
    """Open the abusive clients (blocking sockets, run in a thread); they stay open."""
    held: list[socket.socket] = []
    for i in range(IDLE):
        if s := _connect(port):
            with contextlib.suppress(OSError):
                if i % 2:
                    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
            held.append(s)
    pipelined = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 200
    for _ in range(PIPELINERS):
        if s := _connect(port, rcvbuf=4096):
            with contextlib.suppress(OSError):
                s.sendall(pipelined)
            held.append(s)
    for _ in range(OVERSIZE):
        if s := _connect(port):
            with contextlib.suppress(OSError):
                s.sendall(b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n")
            held.append(s)
    for i in range(GARBAGE):
        if s := _connect(port):
            with contextlib.suppress(OSError):
                s.sendall(os.urandom(2048) + (b"\r\n\r\n" if i % 2 else b""))
            held.append(s)
    return held


def _scrape(port: int) -> float:
    """Seconds until a well-behaved client (fresh connection, 2 s timeout, retrying as
    Prometheus' next scrape would) gets a 200 from /metrics."""
    start = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                if r.status == 200 and b"sensor_predictions_total" in r.read():
                    return time.monotonic() - start
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() - start > 10:
            return float("inf")
        time.sleep(0.2)


@pytest.mark.timeout(150)
async def test_a_flood_of_abusive_clients_starves_neither_scoring_nor_scrapes_nor_reconnects(
        conn: asyncpg.Connection, database: Database, models: Models,
        worker_factory: WorkerFactory) -> None:
    await activate_model(conn, *models.v1)
    worker = worker_factory(INFERENCE_INTERVAL_SECONDS="1").start()
    await worker.until_ready()
    resource.prlimit(worker.pid, resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))
    port = worker.metrics_port
    sim = Simulator(machines=10, seed=7)

    stop = asyncio.Event()
    fed: list[int] = []
    writer = await database.connect()  # the producer's session: not the worker's, kept

    async def feed() -> None:
        while not stop.is_set():
            fed.extend(await insert_readings(writer, [r.values for r in sim.next_batch(10)]))
            await asyncio.sleep(0.1)

    peak_fds = 0

    async def watch_fds() -> None:
        nonlocal peak_fds
        while not stop.is_set():
            peak_fds = max(peak_fds, _fds(worker.pid))
            await asyncio.sleep(0.05)

    feeder = asyncio.create_task(feed())
    watcher = asyncio.create_task(watch_fds())
    try:
        await wait_until(lambda: _scored_some(conn), "first predictions", timeout=10)
        # The baseline is the most the worker held while scoring before the flood, sampled by the
        # watcher: its pool grows with the lanes that join, its doorbell session opens after
        # "ready". Sampled at "ready", it undercounted those.
        await asyncio.sleep(1.5)
        baseline_fds = peak_fds
        before = (await tally(conn)).predicted
        flood_started = time.monotonic()
        held = await asyncio.to_thread(_flood, port)
        flood_took = time.monotonic() - flood_started
        try:
            # The worker's database sessions end in the middle of the flood.
            terminated = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid() AND pid <> $2",
                database.name, writer.get_server_pid())
            assert terminated >= 2  # the pool and the listener, at least
            cut = fed[-1]
            scrapes = []
            while time.monotonic() - flood_started < FLOOD_SECONDS or len(scrapes) < 3:
                scrapes.append(await asyncio.to_thread(_scrape, port))
                await asyncio.sleep(0.3)
            # Scoring went on, readings written after the cut included: the pool reconnected.
            await wait_until(lambda: _scored_above(conn, cut), "scoring after the cut",
                             timeout=10)
        finally:
            for s in held:
                s.close()
        stop.set()
        await asyncio.gather(feeder, watcher)
        await wait_until(lambda: _all_scored(conn), "every reading scored", timeout=15)
        reconnects = await worker.ascrape()
    finally:
        stop.set()
        feeder.cancel()
        watcher.cancel()
        await writer.close()

    print(f"flood: fds {baseline_fds} -> peak {peak_fds} (limit {FD_LIMIT}), scrapes answered"
          f" within {max(scrapes):.2f} s (max of {len(scrapes)}), {terminated} sessions ended,"
          f" {len(held)} abusive clients opened in {flood_took:.1f} s")
    assert worker.proc is not None and worker.proc.poll() is None, worker.tail()
    assert (await tally(conn)).predicted > before + 20, "scoring stalled during the flood"
    assert max(scrapes) <= 3.0, f"a scrape waited {max(scrapes):.1f} s: {scrapes}"
    # Beyond the HTTP cap: the database sessions reopened while the terminated ones still close
    # (the pool, the listener and the doorbell, twice over) and evicted clients whose close is
    # still in flight on a loaded machine (a clean-clone run saw 31 above the cap). Without the
    # cap the 400 clients alone would pass the 256-descriptor limit.
    assert peak_fds <= baseline_fds + HTTP_MAX_CLIENTS + 40, (peak_fds, baseline_fds)
    assert sum(v for k, v in reconnects.items()
               if k.startswith("sensor_db_reconnects_total")) >= 1, reconnects
    assert "EMFILE" not in worker.logs() and "Too many open files" not in worker.logs()


async def _scored_some(conn: asyncpg.Connection) -> bool:
    return (await tally(conn)).predicted > 0


async def _scored_above(conn: asyncpg.Connection, reading_id: int) -> bool:
    t = await tally(conn, above=reading_id)
    return t.predicted > 0


async def _all_scored(conn: asyncpg.Connection) -> bool:
    return (await tally(conn)).missing == 0
