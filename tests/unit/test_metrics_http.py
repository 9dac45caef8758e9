"""The metrics endpoint's HTTP: what a scraper, a health check and a browser send it."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

import pytest

from sensor_predictor.metrics import Metrics, MetricsServer, parse_request_head


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
