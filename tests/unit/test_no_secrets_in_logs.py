"""What the worker logs never carries a password: its settings, and the errors it reports.

Through the real logging setup (JSON lines), no I/O beyond it. The end-to-end check (every
command's whole output, failing connections included) is tests/chaos/test_secrets.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import structlog

from sensor_predictor.config import load_settings
from sensor_predictor.logging_setup import configure_logging

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
