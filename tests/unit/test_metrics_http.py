"""The metrics endpoint's HTTP: what a scraper, a health check and a browser send it."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request
from typing import Any

import pytest

from sensor_predictor.metrics import Metrics, MetricsServer, parse_request_head
from tests.support.waiting import wait_for


def test_a_request_head_is_parsed_with_its_query_dropped_and_headers_lowered() -> None:
    head = b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept: text/plain\r\n\r\n"
    assert parse_request_head(head) == ("GET", "/metrics", {"host": "a", "accept": "text/plain"})
    assert parse_request_head(b"nonsense\r\n\r\n") is None
    assert parse_request_head(b"GET / SPDY/3\r\n\r\n") is None


@pytest.mark.asyncio
async def test_scrapes_keep_alive_head_and_unknown_paths() -> None:
    metrics = Metrics()
    metrics.predictions.inc({})
    state: dict[str, Any] = {"ready": False}
    server = MetricsServer(metrics, lambda: (state["ready"], {"model_version": None}))
    await server.start("127.0.0.1", 0)
    try:
        assert server.port
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)

        async def ask(request: bytes) -> tuple[bytes, bytes]:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length"))
            body = await reader.readexactly(length) if not request.startswith(b"HEAD") else b""
            return head, body

        # Two scrapes on one connection, as Prometheus does.
        for _ in range(2):
            head, body = await ask(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and b"sensor_predictions_total 1" in body
        head, body = await ask(b"HEAD /ready HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and body == b""
        head, _ = await ask(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 404")
        head, _ = await ask(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 405")
        writer.close()
        # The container's health check: urllib, a fresh connection each time.
        state["ready"] = True

        def check() -> tuple[int, dict[str, Any]]:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/ready", timeout=2) as r:
                return r.status, json.loads(r.read())

        status, body_json = await asyncio.to_thread(check)
        assert status == 200 and body_json == {"ready": True, "model_version": None}
    finally:
        await server.stop()


# -- under abuse: what a client can hold is bounded ------------------------------------------


async def _status_of(port: int, request: bytes) -> bytes:
    """The status line the server answers `request` with (b"" when it closes without one)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        line = await asyncio.wait_for(reader.readline(), 2)
        return line.strip()
    finally:
        writer.close()


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Whether the server ends the connection within `seconds` (EOF or reset)."""
    try:
        while await asyncio.wait_for(reader.read(65536), seconds):
            pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


@pytest.mark.asyncio
async def test_the_excess_is_refused_at_once_and_a_stale_client_makes_room() -> None:
    server = MetricsServer(Metrics(), lambda: (True, {}), max_clients=4)
    await server.start("127.0.0.1", 0)
    assert server.port
    try:
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(4)]
        await asyncio.sleep(0.1)
        assert server.clients == 4
        # A fifth, while the four are fresh: refused at once, with a 503.
        assert await _status_of(server.port, b"GET /metrics HTTP/1.1\r\n\r\n") == \
            b"HTTP/1.1 503 Service Unavailable"
        assert server.refused == 1 and server.clients == 4
        # Once they have kept it waiting a second, a new client takes the stalest one's place.
        await asyncio.sleep(1.1)
        assert await _status_of(server.port, b"GET /metrics HTTP/1.1\r\n\r\n") == \
            b"HTTP/1.1 200 OK"
        assert server.evicted == 1
        assert await _closed_within(idle[0][0], 1)  # the first idle one was dropped
        assert not await _closed_within(idle[1][0], 0.1)
        for _, w in idle:
            w.close()
    finally:
        await server.stop()


@pytest.mark.asyncio
async def test_oversize_heads_garbage_and_bodies_end_the_connection() -> None:
    server = MetricsServer(Metrics(), lambda: (True, {}))
    await server.start("127.0.0.1", 0)
    assert server.port
    try:
        big = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n"
        assert await _status_of(server.port, big) == b"HTTP/1.1 431 Request Header Fields " \
            b"Too Large"
        assert await _status_of(server.port, b"\x16\x03\x01\x02\x00\x01\x00\r\n\r\n") == \
            b"HTTP/1.1 400 Bad Request"
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
        assert (await reader.readline()).startswith(b"HTTP/1.1 405")
        assert await _closed_within(reader, 1)
        writer.close()
        await asyncio.sleep(0.05)
        assert server.clients == 0
    finally:
        await server.stop()


@pytest.mark.asyncio
async def test_a_client_that_never_reads_is_dropped_after_the_write_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import sensor_predictor.metrics as metrics_module

    monkeypatch.setattr(metrics_module, "HTTP_WRITE_SECONDS", 0.5)
    metrics = Metrics()
    for i in range(300):  # a body of tens of kilobytes, like a real worker's
        metrics.bad_readings.set({"reason": f"r{i:04d}" + "x" * 40}, i)
    server = MetricsServer(metrics, lambda: (True, {}))
    await server.start("127.0.0.1", 0)
    assert server.port
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 500)  # and never read
        await asyncio.sleep(0.2)
        assert server.clients == 1
        # Dropped well before the 30 s idle timeout could act (it does not, in a blocked write).
        assert await wait_for(lambda: _async(server.clients == 0), timeout=5), \
            "still held past the write timeout"
        writer.close()
    finally:
        await server.stop()


async def _async(value: bool) -> bool:
    return value
