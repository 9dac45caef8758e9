"""A model not in the cache is fetched from MLflow by a short-lived child process, so the worker
itself never imports MLflow or scikit-learn (issue 22, "Memory at rest").

Those two, with pandas and most of scipy that MLflow pulls in, are about 215 MB of a worker's
memory once imported, and a Python process never gives that back. The worker only needs what a
model becomes once verified: the numpy predictor's arrays and their names, the same JSON form the
model cache stores (model_cache.CacheEntry). So the child (model_fetch_child.py) imports
MLflow, fetches and verifies the model exactly as the worker did in a thread before
(model_holder.load_and_verify: allowed sources, no pickle for our JSON artifact, the probe),
writes that form to a file in a private temporary folder, and exits. The worker reads it, builds
the model with numpy and checks it again (model_holder.model_from_entry), then goes on as for
any model: the feature check, the digest, the alignment, the cache (when MODEL_CACHE_DIR is not
`off`).

What it costs: a swap to a model the cache does not hold waits for the child's start and its
import of MLflow (about 10 s on our shared 2 cores at load 4-5, against 0.02 s for the fetch
itself in a process that has imported MLflow already). The old model is served meanwhile, as
during any load; a restart or a rollback to a cached model needs no child at all.

Failures are load failures with a reason (model_types.py), and the old model stays served: the
child's own verdict (a refused source, a missing artifact, MLflow unreachable) comes back in
the file; a child that dies without one is `load_failed`; one that has not finished within
FETCH_TIMEOUT_SECONDS is killed and counted `mlflow_unreachable` (what hangs a fetch is an
MLflow that does not answer). A shutdown kills the child at once, and the child exits by itself
when its parent is gone (its stdin, a pipe from the worker, reaches end of file).

A model without a numpy form (a pipeline other than StandardScaler + KMeans, unpickled from
another tool's run) comes back as such; the worker then loads it in a thread as before and, for
that model only, holds scikit-learn.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

from sensor_predictor.model_cache import CacheEntry, entry_from_json
from sensor_predictor.model_sources import SourcePolicy
from sensor_predictor.model_types import ActiveRow, Bookkeeping, ModelLoadError

log = structlog.get_logger("sensor_predictor.model_fetch")

# Long enough for the child's imports and a slow artifact store on a busy machine; MLflow's own
# HTTP retries (configure_mlflow: 2 retries, 10 s each) give up well before.
FETCH_TIMEOUT_SECONDS = 120.0
CHILD_MODULE = "sensor_predictor.model_fetch_child"
RESULT_FILE = "result.json"
# A standby child (Standby) writes READY_LINE to this inherited descriptor once its imports are
# done, then waits for its request.
READY_FD_ENV = "SENSOR_PREDICTOR_FETCH_READY_FD"
READY_LINE = b"ready\n"
# After a standby is used or died, the next one starts this much later (never on the fetch path;
# or after FETCH_STANDBY_DELAY_SECONDS, when shorter).
STANDBY_RESTART_SECONDS = 5.0
# The standby's niceness: its start (imports, ~2 s of CPU) yields to scoring.
STANDBY_NICE = 10


@dataclass(frozen=True)
class Fetched:
    """What the child handed back: the model's numpy form, or None when it has none."""

    entry: CacheEntry | None
    unpickled: bool
    """Read by unpickling (a run without our JSON artifact, the old trainer's layout)."""


def request_document(row: ActiveRow, model_name: str, bookkeeping: Bookkeeping | None,
                     policy: SourcePolicy, result: Path) -> dict[str, Any]:
    """What the worker tells the child: the model to fetch, from where, and where to answer."""
    return {
        "row": asdict(row), "model_name": model_name,
        "bookkeeping": None if bookkeeping is None else {
            "n_clusters": bookkeeping.n_clusters, "silhouette": bookkeeping.silhouette,
            "profiles": None if bookkeeping.profiles is None else dict(bookkeeping.profiles)},
        "tracking_uri": policy.tracking_uri, "allowed": list(policy.allowed),
        "result": str(result)}


def parse_request(data: dict[str, Any]) -> tuple[ActiveRow, str, Bookkeeping | None,
                                                 SourcePolicy, Path]:
    """The child's side of request_document."""
    b = data["bookkeeping"]
    return (ActiveRow(**data["row"]), str(data["model_name"]),
            None if b is None else Bookkeeping(b["n_clusters"], b["silhouette"], b["profiles"]),
            SourcePolicy(str(data["tracking_uri"]), tuple(data["allowed"])),
            Path(data["result"]))


def read_result(raw: bytes) -> Fetched:
    """The child's answer: a model's numpy form, its absence, or its refusal (raised)."""
    try:
        data = json.loads(raw)
        if data.get("error") is not None:
            error = data["error"]
            raise ModelLoadError(error["reason"], str(error["message"]))
        entry = None if data.get("entry") is None else entry_from_json(data["entry"])
        return Fetched(entry, bool(data["unpickled"]))
    except ModelLoadError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError("load_failed", f"the model fetch process answered something "
                                            f"unreadable: {type(exc).__name__}: {exc}") from None


async def fetch(row: ActiveRow, model_name: str, bookkeeping: Bookkeeping | None,
                policy: SourcePolicy, within: float = FETCH_TIMEOUT_SECONDS,
                standby: Standby | None = None) -> Fetched:
    """Fetch and verify `row`'s model in a child process; ModelLoadError when it cannot. The
    standby's process when it has one ready (its imports done), else a fresh one."""
    folder = Path(tempfile.mkdtemp(prefix="sp-fetch-"))  # 0700: the answer is ours alone
    result = folder / RESULT_FILE
    request = json.dumps(request_document(row, model_name, bookkeeping, policy, result))
    line = request.encode() + b"\n"
    proc: asyncio.subprocess.Process | None = None
    try:
        proc = standby.take() if standby is not None else None
        if proc is not None and not await _ask(proc, line):
            log.warning("fetch_standby_unusable", pid=proc.pid, note="a fresh process instead")
            _kill(proc)
            proc = None
        if proc is None:
            proc = await _spawn(policy.tracking_uri)
            await _ask(proc, line)  # a fresh child that died at once: no answer, load_failed
        try:
            code = await asyncio.wait_for(proc.wait(), within)
        except TimeoutError:
            raise ModelLoadError(
                "mlflow_unreachable",
                f"the model fetch process did not finish within {within:g} s (MLflow not "
                "answering?): killed") from None
        try:
            raw = result.read_bytes()
        except FileNotFoundError:
            raise ModelLoadError("load_failed", f"the model fetch process {_ended(code)} "
                                                "without an answer") from None
        return read_result(raw)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if proc is not None:
            _kill(proc)  # a timeout, a shutdown (cancelled): never left running
            await _reaped(proc)


async def _spawn(tracking_uri: str, ready_fd: int | None = None) -> asyncio.subprocess.Process:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    if ready_fd is not None:
        env[READY_FD_ENV] = str(ready_fd)
    # stdout and stderr are the worker's own: the child logs its lines (MLflow's warnings,
    # a model's) where the worker's go.
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", CHILD_MODULE, stdin=asyncio.subprocess.PIPE, env=env,
        pass_fds=() if ready_fd is None else (ready_fd,))


async def _ask(proc: asyncio.subprocess.Process, line: bytes) -> bool:
    """Write the request; False when the child is gone (its pipe broken). The pipe stays
    open afterwards: the child exits by itself when it reaches end of file (the worker died)."""
    assert proc.stdin is not None
    try:
        proc.stdin.write(line)
        await proc.stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


async def _reaped(proc: asyncio.subprocess.Process) -> None:
    """A killed child's exit, waited for (briefly): reaped, never a zombie, and its transport
    closed (no ResourceWarning for a process still running when it is collected)."""
    with contextlib.suppress(TimeoutError, ProcessLookupError):
        await asyncio.wait_for(proc.wait(), 1.0)


def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    if proc.stdin is not None:
        proc.stdin.close()


class Standby:
    """One fetch process started ahead of need, its imports of MLflow and scikit-learn done,
    waiting on stdin for a request: a swap to an uncached model then waits for the fetch alone
    (tenths of a second), not for a child's start and imports (5-20 s on a busy machine).

    Its cost is its memory (about 200 MB, in a process of its own that the worker's steady
    state does not carry) and, once, its start: after STANDBY delay seconds past the worker's
    first model, and `nice`d, so it does not compete with scoring. It serves one request like
    any fetch child and exits; then (or when it died) another is started after
    STANDBY_RESTART_SECONDS, never on the scoring or the fetch path. It dies with the worker:
    a shutdown kills it (run() is cancelled), a SIGKILLed worker closes its stdin (EOF)."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self._proc: asyncio.subprocess.Process | None = None  # starting, or ready
        self._ready = False
        self._taken = asyncio.Event()

    @property
    def pid(self) -> int | None:
        """The ready standby's process id, None when there is none."""
        return None if self._proc is None or not self._ready else self._proc.pid

    def take(self) -> asyncio.subprocess.Process | None:
        """The ready standby, handed over (no longer ours to replace); None when none is ready
        and alive: the caller starts a fresh child."""
        proc = self._proc
        if proc is None or not self._ready or proc.returncode is not None:
            return None
        self._proc, self._ready = None, False
        self._taken.set()
        return proc

    async def run(self, delay: float) -> None:
        """Keep one standby ready until cancelled (the worker's shutdown, which kills it).
        Whatever goes wrong with one is logged and the next tried: the worker's health does
        not depend on it (a fetch without a standby starts its own child)."""
        await asyncio.sleep(delay)
        while True:
            try:
                await self._one()
            except Exception as exc:
                log.warning("fetch_standby_failed", error=f"{type(exc).__name__}: {exc}")
            finally:
                if self._proc is not None:
                    _kill(self._proc)
                    await _reaped(self._proc)
                self._proc, self._ready = None, False
            await asyncio.sleep(min(delay, STANDBY_RESTART_SECONDS))

    async def _one(self) -> None:
        """Start one standby, wait until it is ready, then until it is taken or dies."""
        started = time.monotonic()
        read_fd, write_fd = os.pipe()
        try:
            self._proc = proc = await _spawn(self.tracking_uri, write_fd)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)  # the child's copy alone: its exit is our end of file
        reader = asyncio.StreamReader()
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", 0))
        try:
            line = await asyncio.wait_for(reader.readline(), FETCH_TIMEOUT_SECONDS)
        except TimeoutError:
            line = b""
        finally:
            transport.close()
        if line != READY_LINE or proc.returncode is not None:
            log.warning("fetch_standby_failed", pid=proc.pid,
                        error="not ready in time, or dead: replaced")
            return
        self._taken.clear()
        self._ready = True
        log.info("fetch_standby_ready", pid=proc.pid,
                 ms=round((time.monotonic() - started) * 1000))
        taken = asyncio.ensure_future(self._taken.wait())
        died = asyncio.ensure_future(proc.wait())
        try:
            await asyncio.wait({taken, died}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            taken.cancel()
            died.cancel()
        if self._proc is proc:  # not taken: it died
            log.warning("fetch_standby_died", pid=proc.pid, code=proc.returncode)


def _ended(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with {code}"


def error_document(reason: str, message: str) -> dict[str, Any]:
    return {"error": {"reason": reason, "message": message}}
