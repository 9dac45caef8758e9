"""The docs cannot drift from the code: every relative link and #anchor of the README and docs/
resolves (GitHub's anchor rules); docs/metrics.md lists exactly the metrics the worker
registers, with their types and labels; the README's configuration table lists every setting
config.py reads, with the default the code has; every alerting rule has a section in
docs/runbooks.md; the README's test commands are the ones CI runs; the README stays a front
door. Fast: files and the code's own objects, no database."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aioprometheus.collectors import Counter, Gauge, Histogram

from sensor_predictor import config
from sensor_predictor.config import Secret, Settings
from sensor_predictor.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
RUNBOOKS = DOCS / "runbooks.md"
RULES = ROOT / "deploy" / "prometheus"


# -- Markdown, as GitHub reads it ------------------------------------------------------------

FENCE = re.compile(r"^\s{0,3}(```|~~~)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"(?<!!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMAGE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")


def prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: the rendered text, lower-cased, punctuation dropped
    (letters, digits, `_` and `-` kept), each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "")
    text = re.sub(r"(\*+|(?<!\w)_+|_+(?!\w))", "", text)  # emphasis, not snake_case names
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a Markdown file: headings (repeats get -1, -2, ...) and HTML anchors."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        found.update(HTML_ANCHOR.findall(line))
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> Iterator[tuple[int, str]]:
    """(line, target) of every link and image outside code."""
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = CODE_SPAN.sub("", line)
        for pattern in (LINK, IMAGE):
            for target in pattern.findall(line):
                yield number, target


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def broken_links(files: list[Path]) -> list[str]:
    broken = []
    for path in files:
        where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        for number, target in links(path):
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
                continue  # http:, https:, mailto:: not ours to check offline
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                broken.append(f"{where}:{number}: {target} (no such file)")
            elif anchor:
                if dest.is_dir() or dest.suffix != ".md":
                    broken.append(f"{where}:{number}: {target} (an anchor into a non-Markdown "
                                  "file)")
                elif anchor not in anchors(dest):
                    broken.append(f"{where}:{number}: {target} (no heading #{anchor} in "
                                  f"{dest.name})")
    return broken


def table_rows(text: str, after_heading: str | None = None) -> list[list[str]]:
    """The cells of every Markdown table row (under the heading `after_heading` only, until
    the next heading of its level or above), header and separator rows left out."""
    rows: list[list[str]] = []
    level: int | None = None
    inside = after_heading is None
    for _, line in prose_lines(text):
        m = HEADING.match(line)
        if m and after_heading is not None:
            if inside and level is not None and len(m.group(1)) <= level:
                inside = False
            if m.group(2) == after_heading:
                inside, level = True, len(m.group(1))
            continue
        if not inside or not line.lstrip().startswith("|"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if all(re.fullmatch(r":?-{3,}:?", c) for c in cells):
            continue
        rows.append(cells)
    return [r for r in rows if r and r[0] not in ("Variable", "Metric")]


def literal(cell: str) -> str | None:
    """The value of a cell that is one code span (`x`), else None."""
    m = re.fullmatch(r"`([^`]*)`", cell.strip())
    return m.group(1) if m else None


# -- links and anchors -----------------------------------------------------------------------

def test_every_relative_link_and_anchor_resolves() -> None:
    files = markdown_files()
    assert len(files) > 5
    assert broken_links(files) == []


def test_the_anchor_rules_are_githubs(tmp_path: Path) -> None:
    assert slug("Exactly once, and nobody waits for somebody else's transaction") == \
        "exactly-once-and-nobody-waits-for-somebody-elses-transaction"
    assert slug("Serving the old trainer's models") == "serving-the-old-trainers-models"
    assert slug("`sensor_drift_score` and the [G-test](x.md)") == \
        "sensor_drift_score-and-the-g-test"
    assert slug("What changed: 1.0 -> 2.0") == "what-changed-10---20"
    assert slug("*Emphasis* and _more_") == "emphasis-and-more"
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Twice\n\n## Twice\n\n```\n## not a heading\n```\n"
                    "[ok](#twice-1) [bad](#not-a-heading) [gone](missing.md) "
                    "[code `[x](nowhere.md)`] [web](https://example.com/#x)\n"
                    '<a name="custom"></a>[custom](#custom) [self](page.md#title)\n')
    assert anchors(page) == {"title", "twice", "twice-1", "custom"}
    assert broken_links([page]) == [
        f"{page}:10: #not-a-heading (no heading #not-a-heading in page.md)",
        f"{page}:10: missing.md (no such file)"]


# -- metrics ---------------------------------------------------------------------------------

KINDS = {Counter: "counter", Gauge: "gauge", Histogram: "histogram"}
METHODS = {"set", "inc", "dec", "add", "observe", "observe_many"}


def series_labels(key: Any) -> set[str]:
    """The label names of one of aioprometheus' series keys (JSON of the labels as bytes, or
    "__EMPTY__" for no labels)."""
    if isinstance(key, bytes | str) and key not in ("__EMPTY__", b"__EMPTY__"):
        return set(json.loads(key))
    return set()


def registered_metrics() -> dict[str, tuple[str, set[str]]]:
    """name -> (type, label names) of every metric the worker registers. Labels: those of the
    series it creates up front, and every literal label dict src/ passes to one of them."""
    metrics = Metrics()
    by_attribute: dict[str, str] = {}
    found: dict[str, tuple[str, set[str]]] = {}
    for attribute, collector in vars(metrics).items():
        kind = next((k for cls, k in KINDS.items() if isinstance(collector, cls)), None)
        if kind is None:
            continue
        by_attribute[attribute] = collector.name
        labels = {key for series in collector.values for key in series_labels(series)}
        found[collector.name] = (kind, labels)
    names = {c.name for c in metrics.registry.get_all()}
    assert names == set(found), "a collector is registered but not an attribute of Metrics"
    for path in (ROOT / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in METHODS and isinstance(node.func.value, ast.Attribute)
                    and node.func.value.attr in by_attribute and node.args
                    and isinstance(node.args[0], ast.Dict)):
                keys = {k.value for k in node.args[0].keys
                        if isinstance(k, ast.Constant) and isinstance(k.value, str)}
                found[by_attribute[node.func.value.attr]][1].update(keys)
    return found


def documented_metrics() -> dict[str, tuple[str, set[str], str]]:
    """name -> (type, label names, meaning) from docs/metrics.md's tables."""
    out: dict[str, tuple[str, set[str], str]] = {}
    for cells in table_rows((DOCS / "metrics.md").read_text(encoding="utf-8")):
        name = literal(cells[0])
        assert name is not None and len(cells) == 4, f"not | `metric` | type | labels | " \
                                                     f"meaning |: {cells}"
        assert name not in out, f"{name} is listed twice"
        labels = set() if cells[2] in ("-", "") else set(re.findall(r"`([^`]+)`", cells[2]))
        out[name] = (cells[1], labels, cells[3])
    return out


def test_docs_metrics_lists_exactly_the_metrics_the_code_registers() -> None:
    code = registered_metrics()
    docs = documented_metrics()
    assert len(code) >= 30
    assert sorted(set(code) - set(docs)) == [], "registered, missing from docs/metrics.md"
    assert sorted(set(docs) - set(code)) == [], "in docs/metrics.md, registered nowhere"


def test_each_metric_has_its_type_labels_and_a_meaning() -> None:
    code = registered_metrics()
    wrong = []
    for name, (kind, labels, meaning) in documented_metrics().items():
        if name not in code:
            continue
        code_kind, code_labels = code[name]
        if kind != code_kind:
            wrong.append(f"{name}: documented as {kind}, registered as a {code_kind}")
        if not code_labels <= labels:
            wrong.append(f"{name}: labels {sorted(code_labels - labels)} not documented")
        if len(meaning) < 10:
            wrong.append(f"{name}: no meaning")
    assert wrong == []


# -- settings --------------------------------------------------------------------------------

ENV_NAME = re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+")


def variables_read() -> set[str]:
    """Every environment variable config.py reads: _VARIABLES, and the names it looks up
    itself (the password and its file, secret files): environ.get("X"), environ["X"],
    "X" in environ, _read_secret_file(env, "X")."""
    names = set(config._VARIABLES)
    tree = ast.parse(Path(config.__file__).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        key: ast.expr | None = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("get", "getenv") and node.args:
            key = node.args[0]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id == "_read_secret_file" and len(node.args) == 2:
            key = node.args[1]  # a secret's file: _read_secret_file(env, "X_FILE")
        elif isinstance(node, ast.Subscript):
            key = node.slice
        elif isinstance(node, ast.Compare) and any(isinstance(op, ast.In | ast.NotIn)
                                                   for op in node.ops):
            key = node.left
        if isinstance(key, ast.Constant) and isinstance(key.value, str) \
                and ENV_NAME.fullmatch(key.value):
            names.add(key.value)
    return names


def code_default(variable: str) -> tuple[bool, Any]:
    """(has a default, the default) of a setting, as Settings has it."""
    attribute = config._VARIABLES[variable][0] if variable in config._VARIABLES \
        else variable.lower()
    field = {f.name: f for f in dataclasses.fields(Settings)}.get(attribute)
    if field is None:
        return False, None
    if field.default is not dataclasses.MISSING:
        value = field.default
    else:
        assert field.default_factory is not dataclasses.MISSING
        value = field.default_factory()
    if isinstance(value, Secret):
        value = value.reveal()
    # None, "" or (): no value of its own (derived, or unset means unset).
    return value not in (None, "", ()), value


def readme_settings() -> dict[str, str]:
    rows = table_rows(README.read_text(encoding="utf-8"), after_heading="Configuration")
    out: dict[str, str] = {}
    for cells in rows:
        name = literal(cells[0])
        assert name is not None and len(cells) == 3, f"not | `VARIABLE` | default | meaning " \
                                                     f"|: {cells}"
        assert name not in out, f"{name} is listed twice"
        out[name] = cells[1]
    return out


def test_the_readme_lists_every_setting_config_reads() -> None:
    read = variables_read()
    listed = readme_settings()
    assert {"POSTGRES_PASSWORD", "POSTGRES_PASSWORD_FILE", "POSTGRES_POOL_MODE",
            "CLAIM_LEASE_SECONDS"} <= read
    assert sorted(read - set(listed)) == [], "read by config.py, not in the README's table"
    assert sorted(set(listed) - read) == [], "in the README's table, read nowhere"


def test_each_setting_has_the_default_the_code_has() -> None:
    wrong = []
    for variable, cell in readme_settings().items():
        if variable not in variables_read():
            continue
        has_default, default = code_default(variable)
        value = literal(cell)
        if not has_default:
            # No value of its own: "-" (unset), or what applies instead ("0.75 x
            # `DRIFT_THRESHOLD`", "`5432` for each host"), which the code derives elsewhere.
            if not cell.strip():
                wrong.append(f"{variable}: the README gives no default")
            continue
        if value is None:
            wrong.append(f"{variable}: the README says {cell!r}, the code has `{default}`")
            continue
        parse = config._VARIABLES[variable][1] if variable in config._VARIABLES else str
        try:
            parsed = parse(value)
        except ValueError as exc:
            wrong.append(f"{variable}: the README's default {value!r} is invalid: {exc}")
            continue
        if parsed != default or (isinstance(default, str) and value != default):
            wrong.append(f"{variable}: the README says {value!r}, the code has {default!r}")
    assert wrong == []


# -- alerts and their runbooks ---------------------------------------------------------------

def rule_files() -> list[Path]:
    files = []
    for path in sorted([*RULES.rglob("*.yml"), *RULES.rglob("*.yaml")]):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            continue  # a promtool test file or a template: promtool checks those
        if isinstance(data, dict) and isinstance(data.get("groups"), list):
            files.append(path)
    return files


def alerts() -> dict[str, dict[str, Any]]:
    """alert name -> its rule, across every rule file."""
    out: dict[str, dict[str, Any]] = {}
    for path in rule_files():
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            for rule in group.get("rules") or []:
                if "alert" in rule:
                    out[rule["alert"]] = rule
    return out


def test_every_alert_has_a_runbook_section() -> None:
    found = alerts()
    if not found:
        pytest.skip(f"no alerting rule file under {RULES.relative_to(ROOT)} yet")
    assert RUNBOOKS.exists(), "alerting rules exist, docs/runbooks.md does not"
    sections = anchors(RUNBOOKS)
    missing = [name for name in found if slug(name) not in sections]
    assert missing == [], "alerts without a `## <AlertName>` section in docs/runbooks.md"
    wrong = []
    for name, rule in found.items():
        url = str((rule.get("annotations") or {}).get("runbook_url", ""))
        if "runbooks.md" in url:
            anchor = url.partition("#")[2]
            if anchor not in sections:
                wrong.append(f"{name}: runbook_url {url} names no section of runbooks.md")
    assert wrong == []


# -- the README: its test commands are CI's, and it stays short ------------------------------

def readme_test_commands() -> list[str]:
    """The pytest commands of the README's "Running the tests" code blocks, comments off."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Running the tests", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.DOTALL):
        for line in block.splitlines():
            command = line.split(" #", 1)[0].strip()
            if "pytest" in command:
                commands.append(" ".join(shlex.split(command)))
    return commands


def ci_test_commands() -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    return [" ".join(shlex.split(line.split(" #", 1)[0])) for line in lines
            if "pytest" in line and not line.lstrip().startswith("#")]


def test_ci_runs_the_readmes_test_commands() -> None:
    readme = readme_test_commands()
    ci = ci_test_commands()
    assert "uv run pytest" in readme and "uv run pytest" in ci
    inner_loop = [c for c in readme if "not slow" in c]
    assert len(inner_loop) == 1, "the README names one inner loop"
    assert [c for c in readme if c not in inner_loop and c not in ci] == [], \
        "a README test command CI does not run"
    assert [c for c in ci if c not in readme] == [], "a CI test command the README does not give"


def test_the_readme_is_a_front_door() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.encode()) <= 12 * 1024, f"README.md is {len(text.encode())} bytes"
    assert len(text.splitlines()) <= 220
    assert re.search(r"`uv run pytest` took \d+ min \d+ s", text), \
        "the README states the measured time of its test command"


def test_docs_index_links_every_page() -> None:
    index = DOCS / "index.md"
    linked = {(index.parent / target.partition("#")[0]).resolve()
              for _, target in links(index) if target.partition("#")[0]}
    pages = {p.resolve() for p in DOCS.rglob("*.md") if p != index}
    assert sorted(str(p.relative_to(ROOT)) for p in pages - linked) == [], \
        "pages docs/index.md does not list"
