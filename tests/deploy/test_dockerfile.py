"""The Dockerfile, read: stages, pinning, user, port, healthcheck, command.

This reads the file (hadolint runs in test_compose.py) and runs the HEALTHCHECK command itself
against a local /ready stand-in; tests/container builds the image and runs it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.support.deploy_files import CLI_NAME, DOCKERFILE, REPO, dockerfile_instructions

INSTRUCTIONS = dockerfile_instructions()


def stages() -> list[list[tuple[str, str]]]:
    """Instructions grouped by build stage (global ARGs before the first FROM are dropped)."""
    out: list[list[tuple[str, str]]] = []
    for keyword, args in INSTRUCTIONS:
        if keyword == "FROM":
            out.append([])
        if out:
            out[-1].append((keyword, args))
    return out


def global_args() -> dict[str, str]:
    values: dict[str, str] = {}
    for keyword, args in INSTRUCTIONS:
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in args:
            name, _, default = args.partition("=")
            values[name] = default
    return values


def only(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    return [args for kw, args in stage if kw == keyword]


FINAL = stages()[-1]


def test_builds_with_the_classic_builder_too() -> None:
    """No BuildKit-only syntax: Debian's docker.io (20.10, no buildx) builds with the classic
    builder, which rejects a `# syntax=` line, RUN --mount/--network/--security and heredocs.
    tests/container builds it that way for real."""
    lines = DOCKERFILE.read_text(encoding="utf-8").splitlines()
    assert not [line for line in lines if re.match(r"#\s*(syntax|check)\s*=", line, re.I)]
    for keyword, args in INSTRUCTIONS:
        assert not re.match(r"--(mount|network|security)\b", args), f"{keyword} {args}"
        assert "<<" not in args, f"heredoc in {keyword}: {args}"
        if keyword in {"COPY", "ADD"}:
            assert not re.search(r"--(link|parents|exclude)\b", args), f"{keyword} {args}"
    assert "PYTHON_IMAGE" in global_args(), "the base image is a build argument"


def test_multi_stage_with_pinned_slim_python_312() -> None:
    assert len(stages()) >= 2
    args = global_args()
    for stage in stages():
        image = stage[0][1].split()[0]
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)
        name, _, tag = image.partition(":")
        assert name == "python", image
        assert re.fullmatch(r"3\.12(\.\d+)?-slim(-\w+)?", tag), f"base image not pinned: {image}"


def test_builder_uses_pinned_uv_and_frozen_sync() -> None:
    builder = stages()[0]
    runs = " ".join(only(builder, "RUN"))
    copies = " ".join(only(builder, "COPY"))
    pinned_pip = re.search(r"pip install\b.*\buv==\d+\.\d+\.\d+", runs)
    pinned_image = re.search(r"--from=ghcr\.io/astral-sh/uv:\d+\.\d+\.\d+", copies)
    assert pinned_pip or pinned_image, "uv must come pinned (uv==X.Y.Z or uv:X.Y.Z image)"
    final_sync = [r for r in only(builder, "RUN") if "uv sync" in r][-1]
    for flag in ("--frozen", "--no-dev", "--no-editable"):
        assert flag in final_sync, f"last `uv sync` lacks {flag}"
    assert "--no-install-project" not in final_sync
    for path in ("pyproject.toml", "uv.lock", "README.md", "src/", "migrations/"):
        assert path in copies, f"{path} is not copied into the builder"


def test_final_stage_gets_only_the_venv() -> None:
    copies = only(FINAL, "COPY")
    assert copies, "the final stage copies nothing"
    for args in copies:
        assert args.startswith("--from="), f"final stage copies from the build context: {args}"
    assert not [r for r in only(FINAL, "RUN") if re.search(r"\b(uv|pip)\b", r)], (
        "the final stage should not install anything itself"
    )


def test_runs_as_non_root() -> None:
    users = only(FINAL, "USER")
    assert users, "no USER in the final stage"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}


def test_exposes_metrics_port() -> None:
    assert "8001" in " ".join(only(FINAL, "EXPOSE")).split()


def test_no_credentials_baked_in() -> None:
    for keyword, args in INSTRUCTIONS:
        if keyword in {"ENV", "ARG", "LABEL"}:
            assert not re.search(r"PASSWORD|SECRET|TOKEN", args, re.IGNORECASE), f"{keyword} {args}"


def test_cmd_runs_the_worker(cli_help: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    entrypoint = only(FINAL, "ENTRYPOINT")
    cmd = json.loads(only(FINAL, "CMD")[-1])
    argv = (json.loads(entrypoint[-1]) if entrypoint else []) + cmd
    assert argv[:2] == [CLI_NAME, "run"], argv
    assert cli_help("run").returncode == 0


# --------------------------------------------------------------------------- HEALTHCHECK


def healthcheck_argv() -> list[str]:
    checks = only(FINAL, "HEALTHCHECK")
    assert len(checks) == 1, "the final stage needs exactly one HEALTHCHECK"
    options, _, command = checks[0].partition("CMD ")
    assert "--interval" in options
    argv = json.loads(command)
    assert isinstance(argv, list), "use the exec form so no shell is needed"
    return [str(a) for a in argv]


def test_healthcheck_uses_python_urllib_on_ready() -> None:
    argv = healthcheck_argv()
    assert argv[:2] == ["python", "-c"], "slim images have no curl: use python -c"
    assert "urllib" in argv[2]
    assert "/ready" in argv[2]


class _Ready(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/ready" else 404)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def ready_server() -> Iterator[tuple[ThreadingHTTPServer, type[_Ready]]]:
    handler = type("Handler", (_Ready,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def run_healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    argv = healthcheck_argv()
    argv[0] = sys.executable  # `python` is the venv's interpreter inside the image
    env = {**os.environ, "METRICS_PORT": str(port)}
    return subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=30, check=False, cwd=REPO
    )


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_healthcheck_follows_ready(
    ready_server: tuple[ThreadingHTTPServer, type[_Ready]], status: int, healthy: bool
) -> None:
    server, handler = ready_server
    handler.status = status
    result = run_healthcheck(server.server_address[1])
    assert (result.returncode == 0) is healthy, shlex.join(healthcheck_argv()) + result.stdout


def test_healthcheck_fails_when_nothing_listens(
    ready_server: tuple[ThreadingHTTPServer, type[_Ready]],
) -> None:
    server, _ = ready_server
    port = server.server_address[1]
    server.shutdown()
    server.server_close()  # the port is free again
    assert run_healthcheck(port).returncode != 0


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = (REPO / ".dockerignore").read_text(encoding="utf-8").split()
    for entry in (".git", ".venv", "**/__pycache__", "bench", "mlruns", "deploy", ".env"):
        assert entry in patterns, f".dockerignore does not exclude {entry}"  # deploy/: secrets
    assert DOCKERFILE.name not in patterns
