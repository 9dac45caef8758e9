"""The child process of model_fetch.py: fetch one model from MLflow, verify it, hand back its
numpy form in a file, exit. Run as `python -m sensor_predictor.model_fetch_child` by the worker,
which writes the request (model_fetch.request_document) as one JSON line on its stdin and keeps
that pipe open: end of file there means the worker is gone, and the child exits at once.

A standby (model_fetch.Standby) is started ahead of need: it imports MLflow and scikit-learn
first, says so on the descriptor READY_FD_ENV names, and only then waits for its request.

Here MLflow and scikit-learn are imported, a model may be unpickled (from an allowed source
only, model_sources.py): all that memory goes away with the process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sensor_predictor.config import ConfigError, load_settings
from sensor_predictor.logging_setup import configure_logging
from sensor_predictor.model_fetch import (
    READY_FD_ENV,
    READY_LINE,
    STANDBY_NICE,
    error_document,
    parse_request,
)
from sensor_predictor.model_holder import entry_of, load_and_verify
from sensor_predictor.model_types import ModelLoadError, mlflow_module


def _exit_when_orphaned() -> None:
    """The worker holds our stdin open while it waits for us; EOF: it died, or gave up."""
    while sys.stdin.buffer.read(65536):
        pass
    os._exit(3)


def _configure_logging() -> None:
    try:
        settings = load_settings()
        configure_logging(settings.log_level, settings.log_format,
                          secrets=settings.secret_values())
    except ConfigError:  # a holder outside a worker (a test, a tool): defaults
        configure_logging(os.environ.get("LOG_LEVEL", "info").lower(), "auto")


def answer(request: dict[str, Any]) -> dict[str, Any]:
    """The document the worker reads (model_fetch.read_result)."""
    row, model_name, bookkeeping, policy, _ = parse_request(request)
    try:
        model = load_and_verify(row, model_name, bookkeeping, policy)
    except ModelLoadError as exc:
        return error_document(exc.reason, str(exc))
    except Exception as exc:  # a bug in a model's own code: a load failure like any other
        return error_document("load_failed", f"{type(exc).__name__}: {exc}")
    entry = entry_of(model)
    return {"entry": None if entry is None else asdict(entry), "unpickled": model.unpickled}


def _preload() -> None:
    """A standby's imports, done before it is asked: what load_and_verify needs; and MLflow's
    tracking store, which it keeps per URI (a SQL store checks its schema when opened: a
    second). Nothing is asked of the store yet: one that does not answer is the fetch's
    failure, reported as such, not the standby's."""
    import mlflow.sklearn
    import sklearn.cluster
    import sklearn.pipeline
    import sklearn.preprocessing  # noqa: F401

    with contextlib.suppress(Exception):
        mlflow.MlflowClient()


def main() -> int:
    _configure_logging()
    ready_fd = os.environ.pop(READY_FD_ENV, None)
    if ready_fd is not None:  # a standby (model_fetch.Standby): imports first, then wait
        with contextlib.suppress(OSError):
            os.nice(STANDBY_NICE)
        _preload()
        with contextlib.suppress(OSError):  # a worker gone meanwhile: EOF below
            os.write(int(ready_fd), READY_LINE)
            os.close(int(ready_fd))
    line = sys.stdin.buffer.readline()
    if not line:  # the worker is gone (or shut down) before it asked
        os._exit(3)
    request = json.loads(line)
    threading.Thread(target=_exit_when_orphaned, name="orphan-watch", daemon=True).start()
    mlflow_module().set_tracking_uri(request["tracking_uri"])  # a standby started before
    document = answer(request)
    result = Path(request["result"])
    tmp = result.with_suffix(".tmp")
    tmp.write_text(json.dumps(document), encoding="utf-8")
    tmp.replace(result)  # whole or absent: a child killed mid-write leaves no answer
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # MLflow's exit handlers take a second: nothing is left to flush or close.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
