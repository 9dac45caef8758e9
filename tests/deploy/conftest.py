"""Fixtures for the deployment-file tests."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from functools import cache
from typing import Any

import pytest

from tests.support.deploy_files import CLI_NAME, find_tool, load_compose, load_dashboard


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="session")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


@pytest.fixture(scope="session")
def cli_help() -> Callable[..., subprocess.CompletedProcess[str]]:
    """`sensor-predictor [args...] --help`, run once per argument list.

    Uses the installed console script (the project venv's), so the commands in compose.yaml and
    the Dockerfile are checked against the real CLI, not against a list kept in this test.
    """
    exe = find_tool(CLI_NAME)
    if exe is None:
        pytest.fail(
            f"`{CLI_NAME}` console script not found on PATH or next to {sys.executable}; "
            "run the tests with the project venv (`uv sync`, then `uv run pytest`)."
        )

    @cache
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [exe, *args, "--help"], capture_output=True, text=True, timeout=120, check=False
        )

    return run
