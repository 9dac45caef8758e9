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
                policy: SourcePolicy, within: float = FETCH_TIMEOUT_SECONDS) -> Fetched:
    """Fetch and verify `row`'s model in a child process; ModelLoadError when it cannot."""
    folder = Path(tempfile.mkdtemp(prefix="sp-fetch-"))  # 0700: the answer is ours alone
    result = folder / RESULT_FILE
    request = json.dumps(request_document(row, model_name, bookkeeping, policy, result))
    env = {**os.environ, "MLFLOW_TRACKING_URI": policy.tracking_uri}
    proc: asyncio.subprocess.Process | None = None
    try:
        # stdout and stderr are the worker's own: the child logs its lines (MLflow's warnings,
        # a model's) where the worker's go.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", CHILD_MODULE, stdin=asyncio.subprocess.PIPE, env=env)
        assert proc.stdin is not None
        proc.stdin.write(request.encode() + b"\n")  # the pipe stays open: see the docstring
        await proc.stdin.drain()
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
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()  # a timeout, a shutdown (cancelled): never left running
        if proc is not None and proc.stdin is not None:
            proc.stdin.close()
        shutil.rmtree(folder, ignore_errors=True)


def _ended(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with {code}"


def error_document(reason: str, message: str) -> dict[str, Any]:
    return {"error": {"reason": reason, "message": message}}
