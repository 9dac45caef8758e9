"""Test helpers, by job; the machinery itself (PostgreSQL, `mlflow server`, the worker as a
process, /metrics parsing, the tally) is the package's own `sensor_predictor.devtools`.

* `databases`: a migrated template database, cloned per test.
* `readings`: readings inserted as the old system's writers insert them.
* `models`: models trained once per session, and their activation.
* `waiting`: polling with a deadline.
* `background`: a scenario run in a thread of its own, beside the tests after it.
* `fixtures`: the fixtures of every tier (registered in tests/conftest.py).
* `chaos`, `chaos_fixtures`: the throwaway cluster the chaos and security tiers own, a stream
  writer that survives outages, a freezable TCP proxy, the invariant every scenario ends on.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
