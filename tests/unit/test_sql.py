"""sql/queries.sql: every name the code looks up exists, each once, and none is dead; and the
package sends no statement written inline (every one is named in the file).

(After procrastinate's tests/unit/test_sql.py: the queries are plain SQL in one file, so a
typo in a name is caught here, not on the path that first runs it.)"""

from __future__ import annotations

import ast
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


# The asyncpg calls that take a statement as their first argument.
STATEMENT_CALLS = {"execute", "executemany", "fetch", "fetchrow", "fetchval", "prepare", "cursor"}
# Development tooling and the demo may keep theirs: they create and drop databases by name
# (an identifier, no parameter can carry it) and imitate the old system's own statements.
INLINE_ALLOWED = ("sensor_predictor/devtools/", "sensor_predictor/demo/")


def _written_inline(arg: ast.expr) -> bool:
    """A string literal, an f-string, or a concatenation or % / .format() of one."""
    if isinstance(arg, ast.Constant):
        return isinstance(arg.value, str)
    if isinstance(arg, ast.JoinedStr):
        return True
    if isinstance(arg, ast.BinOp):
        return _written_inline(arg.left) or _written_inline(arg.right)
    if isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute):
        return arg.func.attr in {"format", "join"} and _written_inline(arg.func.value)
    return False


def _inline_statements() -> list[str]:
    found = []
    for path in sorted((ROOT / "src").rglob("*.py")):
        where = path.relative_to(ROOT / "src").as_posix()
        if where.startswith(INLINE_ALLOWED):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in STATEMENT_CALLS and node.args
                    and _written_inline(node.args[0])):
                found.append(f"src/{where}:{node.lineno}: {ast.unparse(node.args[0])[:60]}")
    return found


def test_the_package_writes_no_statement_inline() -> None:
    inline = _inline_statements()
    assert not inline, "inline SQL; name it in sql/queries.sql:\n" + "\n".join(inline)


def test_the_inline_check_sees_what_it_looks_for() -> None:
    """The check above finds nothing; this says it would find something."""
    calls = [ast.parse(code, mode="eval").body for code in (
        'conn.execute("SELECT 1")', 'conn.fetch("SELECT " + "1")', 'c.fetchval(f"SELECT {x}")',
        'pool.executemany("INSERT INTO t VALUES ($1)", rows)', 'c.execute("A {}".format(x))')]
    assert all(isinstance(c, ast.Call) and _written_inline(c.args[0]) for c in calls)
    named = [ast.parse(code, mode="eval").body for code in (
        'conn.execute(q["x"])', 'conn.fetch(db.queries()["x"].replace("{rows}", v))',
        "conn.fetch(model.read_query, ids)")]
    assert not any(isinstance(c, ast.Call) and _written_inline(c.args[0]) for c in named)
