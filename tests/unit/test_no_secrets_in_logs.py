"""What the worker logs never carries a password: its settings, and the errors it reports.

Through the real logging setup (JSON lines), no I/O beyond it. The end-to-end check (every
command's whole output, failing connections included) is tests/chaos/test_secrets.py.
"""

from __future__ import annotations

import io
import urllib.parse
from collections.abc import Callable, Iterator

import pytest
import structlog

from sensor_predictor.config import load_settings
from sensor_predictor.logging_setup import clear_secrets, configure_logging, redact_text

PG_PASSWORD = "pg-Pa55-7f3c1e9a"
MLFLOW_PASSWORD = "mlflow-Pa55-0b6d2c4e"

Logged = Callable[..., str]


@pytest.fixture
def logged(capsys: pytest.CaptureFixture[str]) -> Iterator[Logged]:
    """Log one event as the worker does (JSON) and return what reached stderr."""
    def log(event: str, **fields: object) -> str:
        configure_logging("info", "json")
        structlog.get_logger("sensor_predictor.test").warning(event, **fields)
        return capsys.readouterr().err

    yield log
    structlog.reset_defaults()


def test_the_postgres_password_never_shows(logged: Logged) -> None:
    settings = load_settings({"POSTGRES_PASSWORD": PG_PASSWORD})
    text = logged("worker_starting", **settings.describe())
    assert "postgres_password" in text
    assert PG_PASSWORD not in text
    assert PG_PASSWORD not in repr(settings)
    assert settings.connect_kwargs()["password"] == PG_PASSWORD  # and it is still used


def test_the_password_of_a_tracking_uri_never_shows(logged: Logged) -> None:
    """MLflow takes basic-auth credentials in the tracking URI (https://user:password@host):
    such a URI is as secret as a DSN with a password. The worker logs its settings at start."""
    uri = f"https://sp-user:{MLFLOW_PASSWORD}@mlflow.internal:5000"
    settings = load_settings({"MLFLOW_TRACKING_URI": uri})
    text = logged("worker_starting", **settings.describe())
    assert MLFLOW_PASSWORD not in text
    assert "mlflow.internal:5000" in text  # still there to read
    assert settings.mlflow_tracking_uri == uri  # and still used


def test_an_error_repeating_a_url_with_credentials_never_shows_them(logged: Logged) -> None:
    """MLflow's errors name the URL they failed on (model_load_failed logs their first line)."""
    error = ("cannot load runs:/0a1b/model from MLflow: API request to "
             f"https://sp-user:{MLFLOW_PASSWORD}@mlflow.internal:5000/api/2.0/mlflow/runs/get"
             " failed with exception HTTPSConnectionPool(host='mlflow.internal', port=5000)")
    text = logged("model_load_failed", reason="mlflow_unreachable", error=error)
    assert MLFLOW_PASSWORD not in text
    assert "/api/2.0/mlflow/runs/get" in text


# -- every secret-bearing setting through every log path ------------------------------------------

AT_PASSWORD = "p@ss:w0rd@x"  # '@' and ':' inside a URL password


@pytest.mark.parametrize(("text", "secret"), [
    ("https://u:p@ss@host/api", "p@ss"),
    (f"https://sp-user:{AT_PASSWORD}@mlflow.internal:5000/api/2.0", AT_PASSWORD),
    ("error at https://me@corp.example:tok3n@host done", "tok3n"),
    ("postgresql://worker:s3:cr@t@db:5432/sensor_data?sslmode=require", "s3:cr@t"),
])
def test_url_passwords_are_redacted_whatever_they_contain(text: str, secret: str) -> None:
    clear_secrets()  # the URL rule alone
    redacted = redact_text(text)
    assert secret not in redacted and "***" in redacted, redacted


def test_urls_without_credentials_are_left_alone() -> None:
    clear_secrets()
    for text in ("http://mlflow:5000/api/2.0/mlflow/runs/get?run_id=ab", "runs:/0a1b/model",
                 "postgresql://worker@db:5432/sensor_data", "mailto:ops@example.com"):
        assert redact_text(text) == text


def _every_log_path(fmt: str, secret_text: str) -> str:
    """One line through each path a line can take: structlog (event text, a field, a nested
    field, a traceback), the stdlib loggers of our libraries (message, args, traceback), a
    warning, and an exception nobody caught."""
    import asyncio
    import logging
    import sys
    import warnings

    out = io.StringIO()
    settings = load_settings(ENV)
    configure_logging("debug", fmt, stream=out, secrets=settings.secret_values())
    log = structlog.get_logger("sensor_predictor.test")
    log.info(f"event {secret_text}")
    log.warning("model_load_failed", error=secret_text)
    log.info("worker_starting", **settings.describe(), nested={"uris": [secret_text]})
    try:
        raise RuntimeError(f"cannot reach {secret_text}")
    except RuntimeError:
        log.exception("batch_failed")
    for name in ("mlflow", "urllib3.connectionpool", "asyncio", "alembic"):
        stdlib = logging.getLogger(name)
        stdlib.warning("request to %s failed", secret_text)
        stdlib.error(f"plain {secret_text}")
        try:
            raise ConnectionError(secret_text)
        except ConnectionError:
            stdlib.exception("retrying")
    # What warnings.warn hands to the logging module once captured (pytest records warnings
    # itself, so the hook is called directly).
    warnings.showwarning(f"deprecated {secret_text}", UserWarning, __file__, 1)

    loop = asyncio.new_event_loop()
    try:  # asyncio's own error path: an exception in a callback
        loop.call_soon(lambda: (_ for _ in ()).throw(OSError(secret_text)))
        loop.run_until_complete(asyncio.sleep(0.01))
    finally:
        loop.close()
    try:
        raise ValueError(secret_text)
    except ValueError:
        sys.excepthook(*sys.exc_info())
    logging.shutdown()
    return out.getvalue()


ENV = {
    "POSTGRES_PASSWORD": PG_PASSWORD,
    "MLFLOW_TRACKING_URI": f"https://sp-user:{AT_PASSWORD}@mlflow.internal:5000",
}
SECRETS = {
    "POSTGRES_PASSWORD": PG_PASSWORD,
    "MLFLOW_TRACKING_URI": AT_PASSWORD,
    "MLFLOW_TRACKING_PASSWORD": "mlflow-env-Pa55/with slash",
    "MLFLOW_TRACKING_TOKEN": "tok-9f8e7d6c5b4a",
}


@pytest.mark.parametrize("fmt", ["json", "console"])
@pytest.mark.parametrize("setting", sorted(SECRETS))
def test_each_secret_setting_through_every_log_path(
        setting: str, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    clear_secrets()
    secret = SECRETS[setting]
    for name in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.setenv(name, SECRETS[name])
    # The text a library would log: the bare value, and for the URI a URL carrying it.
    texts = [secret, f"https://sp-user:{secret}@mlflow.internal:5000/api",
             urllib.parse.quote(secret, safe="")]
    try:
        for text in texts:
            output = _every_log_path(fmt, text)
            for marker in ("event", "model_load_failed", "batch_failed", "mlflow",
                           "urllib3.connectionpool", "asyncio", "deprecated",
                           "unhandled_exception", "retrying"):
                assert marker in output, f"{marker} missing: the path was not exercised"
            assert secret not in output, (setting, fmt, text, output)
            assert urllib.parse.quote(secret, safe="") not in output
    finally:
        structlog.reset_defaults()
        clear_secrets()
