"""`uv run pytest --junitxml=report.xml` works as it is, with pytest's default junit family
(xunit2) and warnings as errors: no test uses a fixture that family refuses (record_property,
record_xml_attribute warn, and the warning fails the test)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REFUSED_BY_XUNIT2 = {"record_property", "record_xml_attribute", "record_xml_property"}


def test_no_test_asks_for_a_fixture_xunit2_refuses() -> None:
    found = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = [a.arg for a in (*node.args.posonlyargs, *node.args.args,
                                        *node.args.kwonlyargs)]
                found += [f"{path.relative_to(ROOT)}:{node.lineno} {node.name}({a})"
                          for a in args if a in REFUSED_BY_XUNIT2]
            elif isinstance(node, ast.Constant) and node.value in REFUSED_BY_XUNIT2 \
                    and path != Path(__file__).resolve():
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not found, f"use record_testsuite_property (valid in xunit2): {found}"


def test_a_junit_report_with_the_default_options(tmp_path: Path) -> None:
    """A real run with the project's configuration: a test that records a figure (as
    test_simulator.py records its drift figures) and the scan above."""
    report = tmp_path / "report.xml"
    (tmp_path / "test_recording.py").write_text(
        "def test_records(record_testsuite_property):\n"
        "    record_testsuite_property('drifted_mean_js', 0.36)\n")
    test = [str(tmp_path / "test_recording.py"),
            "tests/unit/test_junit_report.py::test_no_test_asks_for_a_fixture_xunit2_refuses"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--rootdir={ROOT}",
         "-c", str(ROOT / "pyproject.toml"), *test, f"--junitxml={report}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    xml = report.read_text(encoding="utf-8")
    assert 'tests="2"' in xml and 'failures="0"' in xml and 'errors="0"' in xml
    assert '<property name="drifted_mean_js"' in xml
