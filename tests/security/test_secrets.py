"""No password, and no DSN or URL carrying one, in anything the commands print or serve."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from sensor_predictor.devtools.mlflow_server import MlflowServer
from sensor_predictor.devtools.postgres import free_port
from sensor_predictor.training import activate_model
from tests.support.chaos_fixtures import LoginRole
from tests.support.databases import Database
from tests.support.models import Models
from tests.support.readings import insert_readings, reading

pytestmark = [pytest.mark.asyncio, pytest.mark.security]


def _cli(args: list[str], env: dict[str, str], cwd: Path, until: tuple[str, ...] = (),
         scrape: bool = False, timeout: float = 120) -> tuple[int | None, str]:
    """Run `python -m sensor_predictor.cli ARGS` (stdout and stderr together). A command that
    does not end by itself (a worker) gets SIGTERM once its output shows one of `until`; with
    `scrape`, its /metrics and /ready are read first and added to the output."""
    out = cwd / f"out-{uuid.uuid4().hex[:6]}.txt"
    port = free_port()
    # The models a worker verifies are cached in the test's folder, never the user's ~/.cache.
    full_env = {**os.environ, "MODEL_CACHE_DIR": str(cwd / "model-cache"),
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "3", "METRICS_HOST": "127.0.0.1",
                "METRICS_PORT": str(port), "HEARTBEAT_SECONDS": "1", **env}
    pages = ""
    with open(out, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "sensor_predictor.cli", *args],
                                stdout=sink, stderr=subprocess.STDOUT, env=full_env, cwd=cwd)
        deadline = time.monotonic() + timeout
        try:
            while until and proc.poll() is None and time.monotonic() < deadline:
                text = out.read_text(errors="replace")
                if any(marker in text for marker in until):
                    if "Traceback" in text:  # it is on its way out: let it finish
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            proc.wait(15)
                    elif scrape:
                        pages = "\n".join(_scrape(port, path) for path in ("/metrics", "/ready"))
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)
                    break
                time.sleep(0.1)
            code: int | None = proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            code = None
    return code, out.read_text(errors="replace") + pages


def _last_line(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    return lines[-1][:120] if lines else ""


def _scrape(port: int, path: str) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return str(r.read().decode())
    except urllib.error.HTTPError as e:
        return str(e.read().decode())
    except OSError as e:
        return f"({path}: {e})"


@pytest.mark.slow
@pytest.mark.timeout(400)
async def test_no_password_in_any_output_of_run_migrate_and_train(
        chaos_db: Database, chaos_conn: asyncpg.Connection, chaos_models: Models,
        chaos_mlflow: MlflowServer, login_role: LoginRole, tmp_path: Path,
        report: Any) -> None:
    conn = chaos_conn
    await activate_model(conn, *chaos_models.v1)
    await insert_readings(conn, [reading(i) for i in range(20)])
    wrong = f"Wrong-{uuid.uuid4().hex}-p@ss:w/rd"
    tokens = [login_role.password.split("-")[1], wrong.split("-")[1]]
    wrong_file = tmp_path / "wrong_password"
    wrong_file.write_text(wrong + "\n")
    dead_port = str(free_port())
    dead_mlflow = f"http://127.0.0.1:{free_port()}"
    db = chaos_db.env()
    as_role = {**db, "POSTGRES_USER": login_role.name, "POSTGRES_PASSWORD": "",
               "POSTGRES_PASSWORD_FILE": str(login_role.password_file)}
    # trust authentication ignores the password: the commands get through and still hold it
    as_owner = {**db, "POSTGRES_PASSWORD": wrong}
    run_ends = ("Traceback", "worker_stopped")  # and what shows a worker got where it should
    cases: list[tuple[str, list[str], dict[str, str], tuple[str, ...], bool]] = [
        ("run: nothing listens on the port", ["run"],
         {**db, "POSTGRES_PORT": dead_port, "POSTGRES_PASSWORD": wrong, "LOG_FORMAT": "json"},
         ("database_unavailable", *run_ends), False),
        ("run: nothing listens, console logs, password file", ["run"],
         {**db, "POSTGRES_PORT": dead_port, "POSTGRES_PASSWORD": "",
          "POSTGRES_PASSWORD_FILE": str(wrong_file), "LOG_FORMAT": "console"},
         ("database_unavailable", *run_ends), False),
        ("run: wrong password", ["run", "--no-migrate"],
         {**as_role, "POSTGRES_PASSWORD_FILE": str(wrong_file), "LOG_FORMAT": "json"},
         ("database_misconfigured", *run_ends), False),
        ("run: MLflow unreachable, debug logs", ["run", "--no-migrate"],
         {**as_role, "MLFLOW_TRACKING_URI": dead_mlflow, "LOG_LEVEL": "debug",
          "LOG_FORMAT": "json"}, ("model_load_failed", *run_ends), True),
        ("run: scoring, debug logs", ["run", "--no-migrate"],
         {**as_role, "MLFLOW_TRACKING_URI": chaos_mlflow.uri, "LOG_LEVEL": "debug",
          "LOG_FORMAT": "json"}, ("batch_scored", *run_ends), True),
        ("migrate: nothing listens", ["migrate"],
         {**db, "POSTGRES_PORT": dead_port, "POSTGRES_PASSWORD": wrong}, (), False),
        ("migrate: wrong password", ["migrate"],
         {**as_role, "POSTGRES_PASSWORD_FILE": str(wrong_file)}, (), False),
        ("migrate: permission denied", ["migrate"], as_role, (), False),
        ("train: nothing listens", ["train", "--readings", "2000"],
         {**db, "POSTGRES_PORT": dead_port, "POSTGRES_PASSWORD": wrong,
          "MLFLOW_TRACKING_URI": chaos_mlflow.uri}, (), False),
        ("train: MLflow unreachable", ["train", "--readings", "2000"],
         {**as_owner, "MLFLOW_TRACKING_URI": dead_mlflow}, (), False),
        ("train: works", ["train", "--readings", "2000"],
         {**as_owner, "MLFLOW_TRACKING_URI": chaos_mlflow.uri}, (), False),
    ]

    async def one(name: str, args: list[str], env: dict[str, str], until: tuple[str, ...],
                  scrape: bool) -> tuple[str, int | None, str]:
        async with limit:
            code, output = await asyncio.to_thread(_cli, args, env, tmp_path, until, scrape)
            return name, code, output

    limit = asyncio.Semaphore(4)  # in parallel: each command pays its imports (seconds)
    results = await asyncio.gather(*(one(*case) for case in cases))
    leaks = [f"{name}: {output[-2000:]}" for name, _, output in results
             if any(token in output for token in tokens)]
    summary = [f"{name}: exit {code}" + (f" ({_last_line(output)})" if code else "")
               for name, code, output in results]
    for name, _, output in results:
        assert output.strip(), name
    report(scenario="security: no password in output", runs=len(cases), readings="-",
           lost="-", duplicated="-", recovery="n/a",
           detail="; ".join(summary) + f"; leaks: {len(leaks)}")
    assert leaks == []
    assert any((tmp_path / "model-cache").iterdir()), "no model cached in the test folder"


@pytest.mark.timeout(120)
async def test_no_credentials_of_the_mlflow_tracking_uri_in_the_logs(
        chaos_db: Database, chaos_conn: asyncpg.Connection, chaos_models: Models,
        chaos_mlflow: MlflowServer, tmp_path: Path) -> None:
    """MLflow takes basic-auth credentials in the tracking URI (http://user:password@host):
    such a URI is as secret as a DSN with a password. Reachable, and not."""
    await activate_model(chaos_conn, *chaos_models.v1)
    token = uuid.uuid4().hex
    host_port = chaos_mlflow.uri.removeprefix("http://")
    runs = {}
    for name, where in (("reachable", host_port), ("unreachable", f"127.0.0.1:{free_port()}")):
        env = {**chaos_db.env(), "MLFLOW_TRACKING_URI": f"http://sp:{token}@{where}",
               "LOG_FORMAT": "json"}
        runs[name] = asyncio.to_thread(_cli, ["run"], env, tmp_path,
                                       ("model_swapped", "model_load_failed", "Traceback"))
    results = dict(zip(runs, await asyncio.gather(*runs.values()), strict=True))
    leaked = {name: [ln[:300] for ln in output.splitlines() if token in ln]
              for name, (_, output) in results.items()}
    assert all(code == 0 for code, _ in results.values()), results
    assert leaked == {"reachable": [], "unreachable": []}
