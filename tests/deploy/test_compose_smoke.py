"""compose.yaml, run for real without Docker: our four services' commands, with the environment
compose gives them, as plain processes against the suite's PostgreSQL and a local `mlflow server`
started with the compose service's own flags.

Only what points at other containers is rewritten: the hosts and ports (postgres, mlflow, the
metrics port), the secret file's path (a temp file holding the local password), the PostgreSQL
user and database (the local server's, and a fresh empty database per test), and the mlflow
service's data paths (and its server processes: one, where compose leaves mlflow's default).
Everything else (subcommands, flags, variables) is taken as compose.yaml has it, so a typo in a
service's command or environment fails here.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sensor_predictor.devtools.mlflow_server import MlflowServer, stop_process
from sensor_predictor.devtools.postgres import PgServer, free_port
from sensor_predictor.devtools.prometheus_text import parse_metrics
from sensor_predictor.devtools.prometheus_text import value as series_value
from tests.support.databases import drop_later
from tests.support.deploy_files import (
    CLI_NAME,
    dockerfile_instructions,
    find_tool,
    flag_value,
    interpolate,
    load_compose,
    with_flag,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

OUR_SERVICES = ("migrate", "trainer", "simulator", "predictor")
SECRET_MOUNT = "/run/secrets/"


def service_environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as compose resolves it with no shell variables set (the
    defaults of compose.yaml, which is what `docker compose up` gives out of the box)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): interpolate("" if v is None else str(v), {}) for k, v in env.items()}


def image_environment() -> dict[str, str]:
    """The ENV of the Dockerfile's last (runtime) stage, which compose's environment overrides."""
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    env: dict[str, str] = {}
    for keyword, args in instructions[last_from:]:
        if keyword == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


@dataclass
class Service:
    name: str
    command: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        self._log = open(self.log, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(self.command, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        return self

    def run_to_completion(self, timeout: float) -> None:
        """A one-shot service (restart: "no"): must exit 0, as compose's
        service_completed_successfully requires before its dependants start."""
        self.start()
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_process(self.proc)
            raise AssertionError(f"{self.name} still running after {timeout} s:\n"
                                 f"{self.output()}") from None
        finally:
            self.close()
        assert code == 0, f"{self.name} ({shlex.join(self.command)}) exited {code}:\n" \
                          f"{self.output()}"

    def assert_running(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} ({shlex.join(self.command)}) exited "
                                 f"{self.proc.returncode}:\n{self.output()}")

    def stop(self) -> int | None:
        """SIGTERM (what `docker compose stop` sends), SIGKILL after 10 s like compose."""
        if self.proc is None:
            return None
        code = stop_process(self.proc, timeout=10)
        self.close()
        return code

    def close(self) -> None:
        if hasattr(self, "_log") and not self._log.closed:
            self._log.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:] if self.log.exists() else ""


def http_get(url: str, timeout: float = 2) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(body: str, name: str) -> float | None:
    return series_value(parse_metrics(body), name)


@pytest.fixture
def empty_database(pg_server: PgServer) -> Iterator[str]:
    """A fresh, empty database: the compose migrate service creates the schema itself."""
    name = f"sp_smoke_{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        conn = await pg_server.connect()
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    yield name
    drop_later(pg_server, name)


@pytest.fixture
def compose_mlflow(tmp_path: Path) -> Iterator[MlflowServer]:
    """The compose mlflow service's own command, its paths, host and port made local."""
    service = load_compose()["services"]["mlflow"]
    command = [str(c) for c in service["command"]]
    assert command[:2] == ["mlflow", "server"], command
    exe = find_tool("mlflow")
    assert exe is not None, "mlflow not found next to the interpreter or on PATH"
    root = tmp_path / "mlflow"
    root.mkdir()
    port = free_port()
    assert flag_value(command, "--backend-store-uri").startswith("sqlite:")
    command = with_flag(command, "--backend-store-uri", f"sqlite:///{root}/mlflow.db")
    command = with_flag(command, "--artifacts-destination", str(root / "artifacts"))
    command = with_flag(command, "--host", "127.0.0.1")
    command = with_flag(command, "--port", str(port))
    if "--workers" not in command and "-w" not in command:
        # mlflow's default is 4 server processes, each importing MLflow: 2-3 x the start time
        # on a busy 2-core machine, for a test that sends a handful of requests.
        command = [*command, "--workers", "1"]
    if "--allowed-hosts" in command:  # the compose port, in Host headers, is ours here
        hosts = flag_value(command, "--allowed-hosts").replace(":5000", f":{port}")
        command = with_flag(command, "--allowed-hosts", hosts)
    env = {**_base_env(tmp_path / "mlflow-home"), **service_environment(service)}
    server = Service("mlflow", [exe, *command[1:]], env, tmp_path / "mlflow.log").start()
    store = MlflowServer(f"http://127.0.0.1:{port}", root, server.proc)
    try:
        deadline = time.monotonic() + 120
        while True:
            server.assert_running()
            try:
                if http_get(f"{store.uri}/health", timeout=1)[0] == 200:
                    break
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, f"mlflow not healthy:\n{server.output()}"
            time.sleep(0.3)
        yield store
    finally:
        server.stop()


def _base_env(home: Path) -> dict[str, str]:
    """What a container has that compose does not set: a PATH and a home (none of the test
    runner's own settings leak in)."""
    home.mkdir(parents=True, exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}
    for key in ("LANG", "LC_ALL", "TMPDIR"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def test_compose_services_run_as_plain_processes(
    pg_server: PgServer, empty_database: str, compose_mlflow: MlflowServer, tmp_path: Path
) -> None:
    compose = load_compose()
    cli = find_tool(CLI_NAME)
    assert cli is not None, f"`{CLI_NAME}` not found next to the interpreter or on PATH"
    password_file = tmp_path / "postgres_password"
    password_file.write_text(pg_server.password + "\n", encoding="utf-8")
    metrics_port = free_port()
    image_env = {k: v for k, v in image_environment().items() if k != "PATH"}

    def prepare(name: str) -> Service:
        service = compose["services"][name]
        command = [str(c) for c in service.get("command") or []]
        assert command and command[0] == CLI_NAME, f"{name}: command {command}"
        env = service_environment(service)
        # Where compose points at other containers, point at the local ones.
        assert env.get("POSTGRES_HOST") == "postgres", f"{name}: {env}"
        assert env.get("MLFLOW_TRACKING_URI") == "http://mlflow:5000", f"{name}: {env}"
        secret = env.get("POSTGRES_PASSWORD_FILE", "")
        assert secret.startswith(SECRET_MOUNT), f"{name}: the password is not a secret file"
        assert Path(secret).name in {s if isinstance(s, str) else s["source"]
                                     for s in service.get("secrets", [])}
        env.update({
            "POSTGRES_HOST": pg_server.host,
            "POSTGRES_PORT": str(pg_server.port),
            "POSTGRES_USER": pg_server.user,
            "POSTGRES_DB": empty_database,
            "POSTGRES_PASSWORD_FILE": str(password_file),
            "MLFLOW_TRACKING_URI": compose_mlflow.uri,
            "METRICS_PORT": str(metrics_port),
        })
        if "MODEL_SOURCES_ALLOWED" in env:  # the stack's own MLflow is the local one here
            assert env["MODEL_SOURCES_ALLOWED"] == "http://mlflow:5000", f"{name}: {env}"
            env["MODEL_SOURCES_ALLOWED"] = compose_mlflow.uri
        full_env = {**_base_env(tmp_path / "home"), **image_env, **env}
        return Service(name, [cli, *command[1:]], full_env, tmp_path / f"{name}.log")

    services = {name: prepare(name) for name in OUR_SERVICES}
    services["migrate"].run_to_completion(timeout=120)
    services["trainer"].run_to_completion(timeout=240)
    predictor, simulator = services["predictor"], services["simulator"]
    try:
        predictor.start()
        simulator.start()
        url = f"http://127.0.0.1:{metrics_port}"
        deadline = time.monotonic() + 150
        predictions, body, ready = None, "", 0
        while time.monotonic() < deadline:
            predictor.assert_running()
            simulator.assert_running()
            try:
                ready = http_get(f"{url}/ready")[0]
                status, body = http_get(f"{url}/metrics")
                predictions = metric(body, "sensor_predictions_total") if status == 200 else None
            except (urllib.error.URLError, OSError):
                predictions = None
            if ready == 200 and predictions:
                break
            time.sleep(0.5)
        assert ready == 200, f"/ready answered {ready}:\n{predictor.output()}"
        assert predictions and predictions > 0, f"{body}\n{predictor.output()}"

        async def stored() -> tuple[int, int]:
            conn = await pg_server.connect(empty_database)
            try:
                n = await conn.fetchval("SELECT count(*) FROM predictions")
                active = await conn.fetchval("SELECT count(*) FROM clusters WHERE is_active")
                return int(n), int(active)
            finally:
                await conn.close()

        in_db, active = asyncio.run(stored())
        assert in_db > 0
        assert active == 1  # the trainer's --activate
    finally:
        simulator_code = simulator.stop()
        predictor_code = predictor.stop()
    # Both stop cleanly on SIGTERM, as `docker compose stop` expects.
    assert predictor_code == 0, predictor.output()
    assert simulator_code == 0, simulator.output()
