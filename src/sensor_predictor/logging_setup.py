"""structlog: JSON lines off a terminal, readable lines on one; stable event names throughout."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


# The password of a URL with credentials (http://user:password@host, a DSN): a tracking URI may
# carry one, and MLflow's error messages repeat the URL they failed on.
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*:)[^/\s@]+@")


def redact_url_passwords(_logger: Any, _method: str, event: MutableMapping[str, Any]
                         ) -> MutableMapping[str, Any]:
    """A structlog processor: every text value with a URL password gets *** instead."""
    for key, value in event.items():
        if isinstance(value, str) and "@" in value:
            event[key] = _URL_PASSWORD.sub(r"\g<head>***@", value)
    return event


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None
                      ) -> None:
    """Route structlog (and the stdlib loggers of our libraries) to stderr, or to `stream`."""
    out = stream or sys.stderr
    json_output = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json_output
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_url_passwords,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
    # MLflow, alembic and aiohttp log through the stdlib; keep them quiet unless debugging.
    logging.basicConfig(level=logging.WARNING if level != "debug" else logging.DEBUG,
                        stream=out, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)
