"""The fixtures live in tests/support (fixtures.py, chaos_fixtures.py); test modules import
helpers from tests.support.* and never from here."""

from __future__ import annotations

pytest_plugins = ["tests.support.fixtures", "tests.support.chaos_fixtures"]

# Kept for tests/integration/test_training.py (being rewritten on another branch), which still
# imports these from here; to be removed once it imports them from tests.support.
from tests.support.databases import Database  # noqa: E402
from tests.support.readings import insert_readings, reading  # noqa: E402

__all__ = ["Database", "insert_readings", "reading"]
