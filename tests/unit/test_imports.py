"""The import graph of src/: no cycle, and no module imports another's private names.

Every `import` and `from ... import` counts, at module level or inside a function (an import
deferred to save start-up time is a dependency all the same). A submodule's implicit import of
its own package (running `demo/__init__.py` before `demo/timeline.py`) is not an edge; an
explicit `from sensor_predictor.demo import NAME` is. Read with ast, nothing is imported."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "sensor_predictor"


@dataclass
class Module:
    name: str
    path: Path
    imports: dict[str, int] = field(default_factory=dict)  # module imported -> first line
    private: list[str] = field(default_factory=list)  # "line: module._name"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph(root: Path = SRC) -> dict[str, Module]:
    modules = {_module_name(p, root): Module(_module_name(p, root), p)
               for p in sorted((root / PACKAGE).rglob("*.py"))}
    for module in modules.values():
        package = module.name if module.path.name == "__init__.py" \
            else module.name.rpartition(".")[0]
        aliases: dict[str, str] = {}  # a local name bound to one of our modules
        tree = ast.parse(module.path.read_text(encoding="utf-8"), str(module.path))

        def depend(target: str, line: int, module: Module = module) -> None:
            if target in modules and target != module.name:
                module.imports.setdefault(target, line)

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == PACKAGE:
                        depend(alias.name, node.lineno)
                        if alias.asname:
                            aliases[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                if base.split(".")[0] != PACKAGE:
                    continue
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    if submodule in modules:
                        depend(submodule, node.lineno)
                        aliases[alias.asname or alias.name] = submodule
                        continue
                    depend(base, node.lineno)
                    if alias.name.startswith("_") and base != module.name:
                        module.private.append(f"{node.lineno}: {base}.{alias.name}")
        for node in ast.walk(tree):  # db._private through an imported module's name
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
                    and node.value.id in aliases):
                module.private.append(f"{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    return modules


def _cycles(modules: dict[str, Module]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in modules[v].imports:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for name in modules:
        if name not in index:
            visit(name)
    return found


def _describe(modules: dict[str, Module], component: list[str]) -> str:
    inside = set(component)
    return "; ".join(f"{m} imports {t} (line {line})" for m in component
                     for t, line in modules[m].imports.items() if t in inside)


def test_the_import_graph_of_src_has_no_cycle() -> None:
    modules = _graph()
    assert len(modules) > 30 and "sensor_predictor.worker" in modules
    cycles = _cycles(modules)
    assert not cycles, "import cycles: " + " | ".join(_describe(modules, c) for c in cycles)


def test_no_module_uses_another_modules_private_names() -> None:
    found = {m.name: m.private for m in _graph().values() if m.private}
    assert not found, f"private names of another module: {found}"


def test_the_model_types_depend_on_none_of_their_users() -> None:
    modules = {name.removeprefix(f"{PACKAGE}."): set(m.imports) for name, m in _graph().items()}
    modules = {name: {t.removeprefix(f"{PACKAGE}.") for t in ts} for name, ts in modules.items()}
    users = {"model_holder", "legacy_model", "cluster_registry"}
    assert not users & modules["model_types"]
    for user in users:
        assert "model_types" in modules[user], user
    # The holder uses the other two; they use neither the holder nor each other.
    assert not users & modules["legacy_model"]
    assert not users & modules["cluster_registry"]


@pytest.mark.parametrize(("files", "cycle"), [
    ({"a.py": "from sensor_predictor import b\n", "b.py": "def f():\n"
      "    from sensor_predictor.a import x\n"}, ["sensor_predictor.a", "sensor_predictor.b"]),
    ({"a.py": "import sensor_predictor.b as bee\n", "b.py": "from . import a\n"},
     ["sensor_predictor.a", "sensor_predictor.b"]),
    ({"pkg/__init__.py": "def f():\n    from sensor_predictor.pkg.sub import y\n",
      "pkg/sub.py": "from sensor_predictor.pkg import X\n"},
     ["sensor_predictor.pkg", "sensor_predictor.pkg.sub"]),
    ({"a.py": "from sensor_predictor import b\n", "b.py": "import json\n"}, None),
])
def test_the_walk_finds_a_cycle_it_is_shown(tmp_path: Path, files: dict[str, str],
                                             cycle: list[str] | None) -> None:
    root = tmp_path / PACKAGE
    root.mkdir()
    (root / "__init__.py").write_text("")
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    found = _cycles(_graph(tmp_path))
    assert found == ([cycle] if cycle else [])


def test_the_walk_finds_private_names(tmp_path: Path) -> None:
    root = tmp_path / PACKAGE
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text("_hidden = 1\n")
    (root / "b.py").write_text("from sensor_predictor.a import _hidden\n")
    (root / "c.py").write_text("from sensor_predictor import a\nprint(a._hidden, a.__name__)\n")
    found = {m.name: m.private for m in _graph(tmp_path).values() if m.private}
    assert found == {"sensor_predictor.b": ["1: sensor_predictor.a._hidden"],
                     "sensor_predictor.c": ["2: sensor_predictor.a._hidden"]}
