"""Compile the worker's modules to bytecode before a bench run, as its image does.

The Dockerfile installs with UV_COMPILE_BYTECODE=1, and pip compiles at install too, so a
production worker imports from `__pycache__`. This machine's environment sets
PYTHONDONTWRITEBYTECODE=1 and `uv sync` compiles nothing by default: every worker the bench
starts would compile numpy, asyncpg, structlog and our modules from source again, about 0.2 s
of a restart (0.58-0.65 s against 0.34-0.45 s to import the worker, measured alternately on
2 cores at load 2-3). Measuring that would be measuring this sandbox, not the worker.

What is compiled is what the worker imports (its entry modules' closure, found by importing
them in a child process), not the whole environment (MLflow and scikit-learn: minutes, and
the worker never imports them).
"""

from __future__ import annotations

import json
import os
import py_compile
import subprocess
import sys
from typing import Any

ENTRY_MODULES = ("sensor_predictor.cli", "sensor_predictor.worker")

_LIST = (
    "import importlib, json, sys\n"
    "for m in sys.argv[1:]: importlib.import_module(m)\n"
    "print(json.dumps(sorted({getattr(mod, '__file__', None) or '' for mod in "
    "list(sys.modules.values())} - {''})))\n"
)


def compile_worker(pythonpath: str | None = None) -> dict[str, Any]:
    """Compile the worker's import closure (with `pythonpath` first, for --worker-src);
    returns how many source files were compiled and how many were already current."""
    env = {**os.environ}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", _LIST, *ENTRY_MODULES], env=env, check=True,
                         capture_output=True, text=True).stdout
    files = [f for f in json.loads(out) if f.endswith(".py")]
    compiled = 0
    for path in files:
        cached = _cache_path(path)
        if cached is not None and os.path.exists(cached) \
                and os.path.getmtime(cached) >= os.path.getmtime(path):
            continue
        try:
            py_compile.compile(path, doraise=True)
        except (py_compile.PyCompileError, OSError):
            continue  # a read-only or odd file: imported from source, as before
        compiled += 1
    return {"modules": len(files), "compiled_now": compiled,
            "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE")}


def _cache_path(path: str) -> str | None:
    import importlib.util

    try:
        return importlib.util.cache_from_source(path)
    except (NotImplementedError, ValueError):
        return None
