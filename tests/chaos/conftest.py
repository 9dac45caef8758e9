"""The chaos tier's long hold that runs beside its other tests: scenario 11, a write
transaction open 60 s in another database while a light stream is scored. It starts with the
tier's first test, in a thread and event loop of its own (tests.support.background), with a
database and worker of its own on the tier's cluster; its test in test_open_transactions.py
takes its outcome, before test_pg_restart.py stops that cluster. The tests before it touch
only their own database's sessions and their own roles; for them it is one more transaction
open in another database, which is what it shows holds nothing back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sensor_predictor.devtools.mlflow_server import MlflowServer
from sensor_predictor.devtools.postgres import PgServer
from tests.support.background import Background
from tests.support.chaos_fixtures import Workers, ensure_running
from tests.support.databases import clone, drop
from tests.support.fixtures import model_cache_env
from tests.support.models import Models
from tests.support.open_transactions import write_transaction_open_60_s_elsewhere

HELD_60_S = "test_a_write_transaction_open_for_60_s_in_another_database"


@pytest.fixture(scope="session", autouse=True)
def held_60_s(request: pytest.FixtureRequest, chaos_pg: PgServer, chaos_template: str,
              tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Background[dict[str, Any]] | None]:
    """Scenario 11 under way from the tier's first test on, when its test is selected."""
    if not any(item.name == HELD_60_S for item in request.session.items):
        yield None
        return
    models: Models = request.getfixturevalue("chaos_models")
    mlflow_server: MlflowServer = request.getfixturevalue("mlflow_server")
    shared_cache: Path = request.getfixturevalue("shared_model_cache")
    db = clone(chaos_pg, chaos_template, prefix="chaos_held_")
    workers = Workers(db, mlflow_server, tmp_path_factory.mktemp("held-60-s"),
                      base=model_cache_env(request, shared_cache))
    scenario = Background("held-60-s", lambda: write_transaction_open_60_s_elsewhere(
        db, models, workers))
    try:
        yield scenario
    finally:
        if not scenario.done():  # its test did not take its outcome (the run was cut short)
            workers.stop_all()
        scenario.join()
        workers.stop_all()
        ensure_running(chaos_pg)
        drop(db)
