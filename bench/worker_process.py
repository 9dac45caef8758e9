"""`sensor-predictor run` as a real subprocess: start, scrape, watch its memory and CPU, stop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from sensor_predictor.devtools.postgres import free_port

CLK_TCK = os.sysconf("SC_CLK_TCK")
LATENCY = "sensor_prediction_latency_seconds"


class BenchWorker:
    def __init__(self, env: dict[str, str], log_path: Path, cwd: Path) -> None:
        self.port = free_port()
        self.env = {**os.environ, **env, "METRICS_PORT": str(self.port),
                    "METRICS_HOST": "127.0.0.1", "LOG_FORMAT": "json"}
        self.env.setdefault("LOG_LEVEL", "info")
        self.log_path = log_path
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.session: aiohttp.ClientSession | None = None
        self.started_at = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> BenchWorker:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sensor_predictor.cli", "run"],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)
        return self

    async def _get(self, path: str) -> tuple[int, str]:
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        async with self.session.get(f"http://127.0.0.1:{self.port}{path}") as r:
            return r.status, await r.text()

    async def wait_ready(
        self, timeout: float = 90,  # noqa: ASYNC109 - a polling deadline
    ) -> float:
        """Seconds from spawn to ready (listening, pool, model loaded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited {self.proc.returncode}: {self.tail()}")
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                status, _ = await self._get("/ready")
                if status == 200:
                    return time.monotonic() - self.started_at
            await asyncio.sleep(0.05)
        raise RuntimeError(f"worker not ready in {timeout} s: {self.tail()}")

    async def scrape(self) -> dict[str, float]:
        """Every sample of /metrics by its full series text (name{labels})."""
        status, body = await self._get("/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        return parse_metrics(body)

    def proc_status(self) -> dict[str, int]:
        """VmRSS / VmHWM in bytes (VmHWM: the peak resident set since the process started)."""
        out: dict[str, int] = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
        return out

    def cpu_seconds(self) -> float:
        """User + system CPU of the worker process so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    async def stop(self) -> int | None:
        if self.session is not None:
            await self.session.close()
            self.session = None
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, 20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait, 5)
        self._log.close()
        return self.proc.returncode


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        try:
            out[series] = float(value)
        except ValueError:
            continue
    return out


def latency_buckets(sample: dict[str, float]) -> list[tuple[float, float]]:
    """The latency histogram's cumulative buckets, (upper bound, count), +Inf last."""
    out = []
    prefix = f"{LATENCY}_bucket{{"
    for series, value in sample.items():
        if series.startswith(prefix):
            le = series[len(prefix):].split('le="', 1)[1].split('"', 1)[0]
            out.append((float("inf") if le == "+Inf" else float(le), value))
    return sorted(out)


def histogram_quantile(q: float, before: dict[str, float], after: dict[str, float]
                       ) -> float | None:
    """Prometheus-style quantile of the observations made between two scrapes (linear inside a
    bucket; the last finite bound when it falls in +Inf)."""
    b0 = dict(latency_buckets(before))
    deltas = [(le, n - b0.get(le, 0.0)) for le, n in latency_buckets(after)]
    if not deltas or deltas[-1][1] <= 0:
        return None
    total = deltas[-1][1]
    rank = q * total
    prev_le, prev_n = 0.0, 0.0
    for le, n in deltas:
        if n >= rank:
            if le == float("inf"):
                return prev_le
            if n == prev_n:
                return le
            return prev_le + (le - prev_le) * (rank - prev_n) / (n - prev_n)
        prev_le, prev_n = le, n
    return None
