"""The production tier: every test here runs against what production puts around PostgreSQL
and the worker (a pooler, TLS, a standby, Prometheus and Alertmanager), started by the tests
themselves on free ports. Its own command: `uv run pytest -m production tests/production`."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/production/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.production)
            item.add_marker(pytest.mark.slow)
