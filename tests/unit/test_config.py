"""Settings: the old service's variables and defaults, clear errors, secrets that never print."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sensor_predictor.config import ConfigError, Secret, Settings, load_settings


def test_defaults_are_the_old_services() -> None:
    s = load_settings({})
    assert (s.mlflow_tracking_uri, s.postgres_host, s.postgres_port, s.postgres_user,
            s.postgres_db) == ("http://mlflow:5000", "localhost", 5432, "sensor_user",
                               "sensor_data")
    assert s.postgres_password.reveal() == "sensor_password"
    assert (s.prediction_batch_size, s.inference_interval_seconds, s.drift_threshold,
            s.drift_detection_window, s.metrics_port) == (100, 30.0, 0.1, 100, 8001)


def test_every_variable_is_read() -> None:
    s = load_settings({
        "MLFLOW_TRACKING_URI": "http://m:1", "POSTGRES_HOST": "db", "POSTGRES_PORT": "6543",
        "POSTGRES_USER": "u", "POSTGRES_PASSWORD": "p", "POSTGRES_DB": "d",
        "PREDICTION_BATCH_SIZE": "1000", "INFERENCE_INTERVAL_SECONDS": "2.5",
        "DRIFT_THRESHOLD": "0.2", "DRIFT_DETECTION_WINDOW": "500", "METRICS_PORT": "9000",
        "METRICS_HOST": "127.0.0.1", "DRIFT_EXIT_THRESHOLD": "0.1"})
    assert s == Settings(
        mlflow_tracking_uri="http://m:1", postgres_host="db", postgres_port=6543,
        postgres_user="u", postgres_password=Secret("p"), postgres_db="d",
        prediction_batch_size=1000, inference_interval_seconds=2.5, drift_threshold=0.2,
        drift_detection_window=500, metrics_port=9000, metrics_host="127.0.0.1",
        drift_exit_threshold=0.1)


def test_all_invalid_values_are_reported_together() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({"PREDICTION_BATCH_SIZE": "abc", "DRIFT_THRESHOLD": "1.5",
                       "POSTGRES_PORT": "70000", "INFERENCE_INTERVAL_SECONDS": "0"})
    text = str(err.value)
    for name in ("PREDICTION_BATCH_SIZE='abc'", "DRIFT_THRESHOLD='1.5'", "POSTGRES_PORT='70000'",
                 "INFERENCE_INTERVAL_SECONDS='0'"):
        assert name in text


def test_exit_level_above_threshold_is_refused() -> None:
    with pytest.raises(ConfigError, match="DRIFT_EXIT_THRESHOLD"):
        load_settings({"DRIFT_THRESHOLD": "0.1", "DRIFT_EXIT_THRESHOLD": "0.2"})
    assert load_settings({"DRIFT_THRESHOLD": "0.2"}).drift_exit_level == pytest.approx(0.15)


def test_password_file_wins_and_never_prints(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret-value\n")
    s = load_settings({"POSTGRES_PASSWORD": "other", "POSTGRES_PASSWORD_FILE": str(secret)})
    assert s.postgres_password.reveal() == "s3cret-value"
    assert "s3cret" not in repr(s) and "s3cret" not in str(s.describe())


def test_unreadable_password_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="POSTGRES_PASSWORD_FILE"):
        load_settings({"POSTGRES_PASSWORD_FILE": str(tmp_path / "missing")})


def test_the_command_exits_2_with_a_clear_message() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sensor_predictor.cli", "run"], capture_output=True, text=True,
        env={"PREDICTION_BATCH_SIZE": "-5", "PATH": "/usr/bin:/bin"}, timeout=60)
    assert proc.returncode == 2
    assert "PREDICTION_BATCH_SIZE='-5': must be a positive integer" in proc.stderr
