"""sql/queries.sql: every name the code looks up exists, each once, and none is dead.

(After procrastinate's tests/unit/test_sql.py: the queries are plain SQL in one file, so a
typo in a name is caught here, not on the path that first runs it.)"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from sensor_predictor import db

ROOT = Path(__file__).resolve().parents[2]
# queries() and db.queries() looked up by a literal name, and q[...] where q = db.queries()
LOOKUP = re.compile(r"""(?:queries\(\)|\bq)\[\s*["']([a-z_]+)["']\s*\]""")
SOURCES = [p for p in [*(ROOT / "src").rglob("*.py"), *(ROOT / "bench").rglob("*.py"),
                       *(ROOT / "tests").rglob("*.py")] if p != Path(__file__).resolve()]


def _file_names() -> list[str]:
    text = (resources.files("sensor_predictor") / "sql" / "queries.sql").read_text("utf-8")
    return re.findall(r"^-- name: ([a-z_]+)\s*$", text, re.MULTILINE)


def _looked_up() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in SOURCES:
        for name in LOOKUP.findall(path.read_text(encoding="utf-8")):
            found.setdefault(name, []).append(str(path.relative_to(ROOT)))
    return found


def test_every_name_the_code_looks_up_exists() -> None:
    known = set(db.queries())
    missing = {name: where for name, where in _looked_up().items() if name not in known}
    assert not missing, f"looked up but not in sql/queries.sql: {missing}"


def test_every_name_is_defined_once() -> None:
    names = _file_names()
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert set(names) == set(db.queries())


def test_every_query_has_a_body_and_no_trailing_semicolon() -> None:
    for name, sql in db.queries().items():
        assert sql.strip(), name
        assert not sql.rstrip().endswith(";"), name


def test_no_named_query_is_dead() -> None:
    used = set(_looked_up())
    # (feature_expression is looked up by db.read_range_query as a literal q[...] too.)
    dead = set(db.queries()) - used
    assert not dead, f"named in sql/queries.sql but used nowhere: {sorted(dead)}"
