"""`sensor-predictor run` as a real subprocess: start, wait until ready, scrape, watch its
memory and CPU, signal, stop. Its JSON logs go to a file. The blocking calls have async
counterparts (`until_ready`, `seconds_to_ready`, `ascrape`, `astop`) for code whose event loop
must keep running."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from sensor_predictor.devtools.postgres import free_port
from sensor_predictor.devtools.prometheus_text import parse_metrics
from sensor_predictor.devtools.prometheus_text import value as series_value

__all__ = ["WorkerNotReady", "WorkerProcess"]

CLK_TCK = os.sysconf("SC_CLK_TCK")


class WorkerNotReady(RuntimeError):
    """The worker exited, or was not ready in time; the message ends with its log's tail."""


@dataclass
class WorkerProcess:
    env: dict[str, str]
    log_path: Path
    metrics_port: int = field(default_factory=free_port)
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0  # time.monotonic() of the spawn
    ready_after: float | None = None  # seconds from the spawn to the first ready answer

    def start(self, *args: str) -> WorkerProcess:
        env = {**os.environ, **self.env, "METRICS_PORT": str(self.metrics_port),
               "METRICS_HOST": "127.0.0.1", "LOG_FORMAT": "json"}
        env.setdefault("LOG_LEVEL", "info")
        # A model cache beside the log (workers of one test or one bench run share it), never
        # the user's home. A caller may name one in MODEL_CACHE_DIR: the test suite shares one
        # per run (an entry is keyed by tracking URI, run and version, and a run never
        # changes), except for the tests of MLflow fetches and of the cache itself.
        env.setdefault("MODEL_CACHE_DIR", str(self.log_path.parent / "model-cache"))
        # What this start writes begins here (a restart appends to the same log).
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log: IO[bytes] = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.started_at = time.monotonic()
        self.ready_after = None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sensor_predictor.cli", "run", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.cwd)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    # -- HTTP ---------------------------------------------------------------------------------

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.metrics_port}{path}"

    def get(self, path: str, timeout: float = 2) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url(path), timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def ready(self) -> dict[str, Any] | None:
        """/ready's JSON body, or None when nothing answers."""
        try:
            status, body = self.get("/ready", timeout=1)
        except (urllib.error.URLError, OSError):
            return None
        return json.loads(body) if status in (200, 503) else None

    def scrape(self) -> dict[str, float]:
        """Every sample of /metrics by its full series text (name{labels})."""
        status, body = self.get("/metrics", timeout=5)
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        return parse_metrics(body)

    def metric(self, name: str, labels: str = "") -> float | None:
        """One sample from a live scrape (exact series name and label text, e.g. 'reason="x"')."""
        return series_value(self.scrape(), name, labels)

    async def ascrape(self) -> dict[str, float]:
        return await asyncio.to_thread(self.scrape)

    # -- waiting ------------------------------------------------------------------------------

    def _state_if(self, key: str) -> dict[str, Any] | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise WorkerNotReady(f"worker exited with {self.proc.returncode}:\n{self.tail()}")
        state = self.ready()
        if state and state.get(key):
            if key == "ready" and self.ready_after is None:
                self.ready_after = time.monotonic() - self.started_at
            return state
        return None

    def wait_ready(self, timeout: float = 90, key: str = "ready") -> dict[str, Any]:
        """Block until /ready reports `key` true ("ready", or "listening" with no model yet)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if state := self._state_if(key):
                return state
            time.sleep(0.05)
        raise WorkerNotReady(f"worker not {key} after {timeout} s:\n{self.tail(4000)}")

    async def until_ready(self, within: float = 90, key: str = "ready") -> dict[str, Any]:
        """wait_ready for async code: the event loop (writers, listeners) keeps running."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if state := await asyncio.to_thread(self._state_if, key):
                return state
            await asyncio.sleep(0.05)
        raise WorkerNotReady(f"worker not {key} after {within} s:\n{self.tail(4000)}")

    async def seconds_to_ready(self, within: float = 90) -> float:
        """until_ready, then the seconds from the spawn to ready (listening, pool, model)."""
        await self.until_ready(within)
        assert self.ready_after is not None
        return self.ready_after

    # -- the process --------------------------------------------------------------------------

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 15) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM and wait (SIGKILL after `timeout`); the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.wait(5)
        self._log.close()
        return self.proc.returncode

    async def astop(self, timeout: float = 20) -> int | None:  # noqa: ASYNC109 - SIGKILL after
        return await asyncio.to_thread(self.stop, timeout)

    def request_stop(self) -> None:
        """SIGTERM, if it still runs; `wait_stopped` or `stop` then waits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout: float = 15) -> None:
        """Until it has exited or logged worker_stopped: its work is committed and its
        connections closed; what is left is the interpreter's own exit, about a second once it
        has imported MLflow. SIGKILL after `timeout`. `reap_in_background` (or `stop`, `wait`)
        reaps it."""
        if self.proc is None:
            return
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and b'"worker_stopped"' not in self._log_tail():
            if time.monotonic() > deadline:
                self.proc.kill()
                return
            time.sleep(0.02)

    def reap_in_background(self, timeout: float = 30) -> threading.Thread | None:
        """Reap the process the moment it exits, from a daemon thread, so that a caller done
        with it need not wait for its interpreter's exit and no <defunct> entry stays behind.
        SIGKILL if it still runs after `timeout`."""
        if self.proc is None:
            return None
        return reap_when_exits(self.proc, timeout, self._log.close)

    def _log_tail(self, n: int = 2048) -> bytes:
        """The last `n` bytes this start wrote to the log."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(self._log_start, f.seek(0, os.SEEK_END) - n))
                return f.read()
        except OSError:
            return b""

    def proc_status(self) -> dict[str, int]:
        """VmRSS / VmHWM in bytes (VmHWM: the peak resident set since the process started)."""
        out: dict[str, int] = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, raw = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(raw.split()[0]) * 1024
        return out

    def cpu_seconds(self) -> float:
        """User + system CPU of the worker process so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    # -- its logs -----------------------------------------------------------------------------

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, n: int = 3000) -> str:
        return self.logs()[-n:]

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines, parsed (anything else skipped)."""
        out = []
        for line in self.logs().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


def reap_when_exits(proc: subprocess.Popen[bytes], timeout: float = 30,
                    then: Callable[[], object] | None = None) -> threading.Thread:
    """Wait for `proc` in a daemon thread (SIGKILL after `timeout`), which reaps it as it exits;
    `then` runs after. A child nobody waits for stays a zombie until its parent ends."""
    def reap() -> None:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if then is not None:
            then()

    thread = threading.Thread(target=reap, name=f"reap-{proc.pid}", daemon=True)
    thread.start()
    return thread
