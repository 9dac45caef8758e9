"""Re-scoring history is explicit: a separate command, idempotent, outside the live cursor."""

from __future__ import annotations

import os
import subprocess
import sys

import asyncpg
import pytest

from sensor_predictor.devtools.mlflow_server import mlflow_env
from tests.support.databases import Database
from tests.support.models import Models
from tests.support.readings import insert_readings, reading

pytestmark = pytest.mark.asyncio


def _rescore(database: Database, models: Models, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **database.env(), **mlflow_env(models.store.uri), "LOG_LEVEL": "warning"}
    return subprocess.run([sys.executable, "-m", "sensor_predictor.cli", "rescore", *args],
                          env=env, capture_output=True, text=True, timeout=120)


async def test_rescore_adds_one_prediction_per_reading_for_the_chosen_model(
        database: Database, conn: asyncpg.Connection, models: Models) -> None:
    ids = await insert_readings(conn, [reading(i) for i in range(30)] + ["[1]"])
    run_id, version = models.v2
    first = _rescore(database, models, "--run-id", run_id, "--version", str(version),
                     "--batch-size", "7")
    assert first.returncode == 0, first.stderr
    assert f"model_version={version} readings=31 predicted=30 errors=1" in first.stdout
    rows = await conn.fetch("SELECT reading_id, model_version, mlflow_run_id FROM predictions")
    assert sorted(r["reading_id"] for r in rows) == ids[:30]
    assert {(r["model_version"], r["mlflow_run_id"]) for r in rows} == {(str(version), run_id)}

    again = _rescore(database, models, "--run-id", run_id, "--version", str(version))
    assert "predicted=0 errors=0" in again.stdout  # idempotent: nothing written twice
    # The live worker's bookkeeping is untouched: re-scoring is not scoring.
    assert await conn.fetchval("SELECT reading_id FROM scoring_cursor") == 0


async def test_rescore_with_an_unknown_run_fails_clearly(database: Database, models: Models
                                                          ) -> None:
    proc = _rescore(database, models, "--run-id", "f" * 32)
    assert proc.returncode == 1
    assert "cannot load runs:/ffff" in proc.stderr
