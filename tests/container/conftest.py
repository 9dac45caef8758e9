"""The container tier's fixtures: a docker daemon, the stand-in base, our image, a report.

Run it with `uv run pytest -m container tests/container` (the plain `uv run pytest` leaves it
out: pyproject's addopts deselect the `container` marker). Where docker.io cannot be installed
or its daemon cannot start, every test here is skipped with the reason; with
CONTAINER_TIER_REQUIRED=1 (CI) that is a failure instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.container_image import PYENV_ROOT, ensure_base_image, pyenv_python
from tests.support.docker import (
    REPORT,
    Daemon,
    Docker,
    Image,
    Unavailable,
    build_image,
    ensure_tools,
    start_daemon,
)

IMAGE_TAG = "sensor-predictor:container-tier"


def _unavailable(reason: str) -> None:
    if os.environ.get("CONTAINER_TIER_REQUIRED") == "1":
        pytest.fail(f"containers cannot run here (CONTAINER_TIER_REQUIRED=1): {reason}")
    pytest.skip(f"containers cannot run here: {reason}")


@pytest.fixture(scope="session")
def tier_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("container-tier")
    REPORT["logs"] = str(path)
    return path


@pytest.fixture(scope="session")
def daemon(tier_logs: Path) -> Iterator[Daemon]:
    try:
        ensure_tools()
        started = start_daemon(tier_logs / "dockerd.log")
    except Unavailable as exc:
        _unavailable(str(exc))
    REPORT["daemon"] = (f"dockerd {started.version}, "
                        + ("started by the tier" if started.proc else "already running"))
    yield started
    started.stop()


@pytest.fixture(scope="session")
def docker(daemon: Daemon) -> Docker:
    return daemon.docker


@pytest.fixture(scope="session")
def base_image(docker: Docker, tier_logs: Path) -> str:
    if pyenv_python() is None:
        _unavailable(f"no pyenv CPython 3.12 under {PYENV_ROOT}/versions for the base image")
    tag = ensure_base_image(docker.exe, tier_logs / "base.log")
    REPORT["base image"] = tag
    return tag


@pytest.fixture(scope="session")
def image(docker: Docker, base_image: str, tier_logs: Path) -> Image:
    built = build_image(docker, base_image, IMAGE_TAG, tier_logs / "build.log")
    REPORT["image"] = (f"{built.tag} ({built.id[7:19]}): {built.size_bytes / 1e6:.0f} MB, "
                       f"built in {built.build_seconds:.0f} s on {base_image}")
    return built


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if REPORT:
        terminalreporter.section("container tier")
        for key, value in REPORT.items():
            terminalreporter.write_line(f"{key}: {value}")
