"""Logging out of the demo's way: everything but the progress goes to <workdir>/demo.log."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import IO

from sensor_predictor.logging_setup import configure_logging


def log_to_file(path: Path, level: str) -> IO[str]:
    """structlog (JSON lines), the stdlib loggers (MLflow, alembic, pgserver) and warnings go to
    `path`, so the terminal shows the progress only."""
    handle = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed by run_demo
    # The service's own logging set-up (secrets redacted), pointed at the file.
    configure_logging(level, "json", stream=handle)
    for name in ("mlflow", "alembic", "pgserver"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    logging.captureWarnings(True)
    return handle


def quiet_mlflow() -> None:
    """Before MLflow is imported: it would otherwise put its own stderr handler on its loggers
    and draw artifact progress bars over the status line."""
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
