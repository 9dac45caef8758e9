"""The fixtures live in tests/support (fixtures.py, chaos_fixtures.py); test modules import
helpers from tests.support.* and never from here."""

from __future__ import annotations

import compileall
import importlib.util
import os
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
    # (UV_COMPILE_BYTECODE=1; the dependencies are compiled by `uv sync --compile-bytecode`,
    # .ci/run and the README). This machine sets PYTHONDONTWRITEBYTECODE=1: without this, each
    # process compiles our package again.
    compileall.compile_dir(Path(__file__).resolve().parents[1] / "src", quiet=1)
    config.addinivalue_line(
        "markers", "own_model_cache: the test's workers get a model cache of their own, empty"
        " at the start (tests of MLflow fetches and of the cache); others share the run's")


def pytest_report_header() -> str | None:
    """Say so when the dependencies were installed without bytecode (the suite takes about a
    third longer: every process the tests start compiles MLflow and scikit-learn again)."""
    spec = importlib.util.find_spec("mlflow")
    if spec is None or spec.origin is None or not os.environ.get("PYTHONDONTWRITEBYTECODE"):
        return None
    if os.path.exists(importlib.util.cache_from_source(spec.origin)):
        return None
    return ("bytecode: the environment's packages are not compiled and PYTHONDONTWRITEBYTECODE"
            " is set; `uv sync --all-groups --all-extras --compile-bytecode` makes this run"
            " about a third faster")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
