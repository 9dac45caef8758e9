"""structlog: JSON lines off a terminal, readable lines on one; stable event names throughout.

Every line goes through one redaction, whoever logs it: our structlog events, the stdlib loggers
of our libraries (mlflow, urllib3, asyncio, alembic, ...) rendered by the same processors, and
an exception nobody caught (sys.excepthook). Two rules, both applied to every text value,
nested ones and tracebacks included:

- the password of any URL with credentials (scheme://user:password@host) becomes ***, whatever
  characters it holds (`https://u:p@ss@host` -> `https://u:***@host`: everything up to the
  last `@` before the path is the credentials);
- every registered secret value (the PostgreSQL password, the credentials of the tracking URI,
  MLFLOW_TRACKING_PASSWORD / _TOKEN and the like from the environment) becomes *** wherever it
  appears, plain or percent-encoded: the backstop for a secret the URL rule cannot see.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import urllib.parse
from collections.abc import Iterable, MutableMapping
from types import TracebackType
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}

# The password of a URL with credentials (http://user:password@host, a DSN): a tracking URI may
# carry one, and MLflow's error messages repeat the URL they failed on. The user part stops at
# the first ':'; the password runs to the last '@' before the path ('/') or a blank, so an '@'
# or ':' inside it is covered. (A '/' inside a password is not valid in a URL unencoded; the
# registered-secret rule below covers that case for our own settings.)
_URL_PASSWORD = re.compile(
    r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:]*:)[^/\s]*@(?=[^/\s@]*(?:[/\s]|$))")

# Environment variables whose values are secrets whoever reads them (MLflow's client, boto3,
# libpq): registered at configure time so that no log line repeats them.
SECRET_ENVIRONMENT = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "POSTGRES_PASSWORD",
                      "PGPASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                      "AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_CONNECTION_STRING")
# Shorter values are not registered: masking every "ab" in every line would make logs useless
# and hide nothing an attacker could not guess.
MIN_SECRET_LENGTH = 4

_secrets: set[str] = set()
_secret_pattern: re.Pattern[str] | None = None


def register_secrets(values: Iterable[str]) -> None:
    """Mask these values (and their percent-encodings) in every log line from now on."""
    global _secret_pattern
    for value in values:
        if value and len(value) >= MIN_SECRET_LENGTH:
            _secrets.update({value, urllib.parse.quote(value, safe=""),
                             urllib.parse.quote_plus(value)})
    if _secrets:
        ordered = sorted(_secrets, key=len, reverse=True)  # the longest first
        _secret_pattern = re.compile("|".join(re.escape(s) for s in ordered))


def clear_secrets() -> None:
    """Forget the registered secrets (tests; a process keeps its own for its lifetime)."""
    global _secret_pattern
    _secrets.clear()
    _secret_pattern = None


def url_credentials(uri: str) -> list[str]:
    """The password (and user) of a URI with credentials, plain and decoded."""
    match = re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://([^/\s]*)@", uri)
    if not match:
        return []
    _user, _, password = match.group(1).partition(":")
    found = [password, urllib.parse.unquote(password)] if password else []
    return [v for v in found if v]


def redact_text(text: str) -> str:
    """`text` with URL passwords and registered secrets masked."""
    if "@" in text:
        text = _URL_PASSWORD.sub(r"\g<head>***@", text)
    if _secret_pattern is not None:
        text = _secret_pattern.sub("***", text)
    return text


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: _redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redact(v) for v in value)
    if isinstance(value, BaseException):
        return redact_text(str(value))
    return value


def redact_url_passwords(_logger: Any, _method: str, event: MutableMapping[str, Any]
                         ) -> MutableMapping[str, Any]:
    """A structlog processor: every text value (nested ones too) with a URL password or a
    registered secret gets *** instead."""
    for key, value in list(event.items()):
        if key.startswith("_"):  # the stdlib record and our formatter's metadata
            continue
        event[key] = _redact(value)
    return event


def _stdlib_message(_logger: Any, _method: str, event: MutableMapping[str, Any]
                    ) -> MutableMapping[str, Any]:
    """A stdlib record's message (its args applied) as the event text."""
    record = event.get("_record")
    if isinstance(record, logging.LogRecord):
        event["event"] = record.getMessage()
    return event


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None,
                      secrets: Iterable[str] = ()) -> None:
    """Route structlog and the stdlib loggers (mlflow, urllib3, asyncio...) to stderr, or to
    `stream`, through the same redaction; `secrets` are masked wherever they appear."""
    register_secrets([*secrets, *(os.environ.get(n, "") for n in SECRET_ENVIRONMENT),
                      *url_credentials(os.environ.get("MLFLOW_TRACKING_URI", ""))])
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
    # MLflow, urllib3, asyncio, alembic and aiohttp log through the stdlib: the same
    # processors render them (a JSON line with their logger's name), so the same redaction
    # applies. Quiet unless debugging.
    handler = logging.StreamHandler(out)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_logger_name,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _stdlib_message,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact_url_passwords,
            renderer,
        ]))
    logging.basicConfig(level=logging.WARNING if level != "debug" else logging.DEBUG,
                        handlers=[handler], force=True)
    logging.captureWarnings(False)  # (re)install: whoever replaced the hook since
    logging.captureWarnings(True)  # warnings.warn(...) text goes through the same path
    sys.excepthook = _log_uncaught


def _log_uncaught(kind: type[BaseException], exc: BaseException,
                  tb: TracebackType | None) -> None:
    """An exception nobody caught: logged (redacted) instead of Python's raw traceback."""
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    structlog.get_logger("sensor_predictor").error("unhandled_exception",
                                                   exc_info=(kind, exc, tb))
