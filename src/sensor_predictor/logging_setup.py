"""structlog: JSON lines off a terminal, readable lines on one; stable event names throughout."""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Route structlog (and the stdlib loggers of our libraries) to stderr."""
    json_output = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json_output
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # MLflow, alembic and aiohttp log through the stdlib; keep them quiet unless debugging.
    logging.basicConfig(level=logging.WARNING if level != "debug" else logging.DEBUG,
                        stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
