"""The fixtures live in tests/support (fixtures.py, chaos_fixtures.py); test modules import
helpers from tests.support.* and never from here."""

from __future__ import annotations

import compileall
from pathlib import Path

import pytest

pytest_plugins = ["tests.support.fixtures", "tests.support.chaos_fixtures"]

# What makes a test take more than a few seconds: a worker process (5-20 s to start here),
# an MLflow store (importing MLflow, logging a model), the session's trained models, or the
# chaos tier's own cluster. A test using any of them is `slow` whatever its own marks say, so
# `pytest -m "not slow"` stays the quick inner loop.
SLOW_FIXTURES = frozenset({
    "worker_factory", "workers", "models", "served_models", "mlflow_store", "mlflow_server",
    "mlflow_uri",  # tests/integration/test_training.py: a sqlite store of its own
    "chaos_pg", "chaos_db", "chaos_conn", "chaos_models", "chaos_mlflow",
})


def pytest_configure(config: pytest.Config) -> None:
    # The worker processes the tests start import our package as bytecode, as the image's do
    # (UV_COMPILE_BYTECODE=1; `uv sync` compiles the dependencies, pyproject's [tool.uv]). This
    # machine sets PYTHONDONTWRITEBYTECODE=1: without this, each process compiles it again.
    compileall.compile_dir(Path(__file__).resolve().parents[1] / "src", quiet=1)
    config.addinivalue_line(
        "markers", "own_model_cache: the test's workers get a model cache of their own, empty"
        " at the start (tests of MLflow fetches and of the cache); others share the run's")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
