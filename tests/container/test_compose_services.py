"""compose.yaml's services that run our image, run as containers of the image just built.

`migrate`, then `trainer` (train --activate), `simulator` and `predictor`, each with its command,
restart policy, healthcheck setting, environment and password secret as compose.yaml gives them,
on the host network only, against a PostgreSQL cluster of the test's own (password logins
enforced, so the secret is really used) and a real `mlflow server` process started with the
compose mlflow service's flags. Only what points at other containers is rewritten: the hosts
and ports (postgres, mlflow, the metrics port) and the host file behind the secret. The
healthcheck is the image's own command; only its interval is shortened (2 s, not 15 s) so the
tier does not wait minutes for a state change.

Least privilege as compose.yaml has it: only `migrate` logs in as the tables' owner; the
predictor, the trainer and the simulator log in with the login roles that
deploy/postgres/service_roles.sql creates (run here against the test's cluster as the postgres
image's init script runs it), each with its own password secret, and the predictor's session is
checked from inside the database: no superuser, no COPY ... TO PROGRAM.

The tests run in order on one stack (each builds on what the one before left running).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from sensor_predictor.devtools.mlflow_server import MlflowServer, stop_process
from sensor_predictor.devtools.postgres import PgServer, free_port, pg_bin, pg_ctl, start_cluster
from sensor_predictor.devtools.tally import tally
from tests.support import ROOT
from tests.support.deploy_files import find_tool, flag_value, interpolate, load_compose, with_flag
from tests.support.docker import REPORT, Container, Docker, Image, run_container, wait_until
from tests.support.readings import FEATURES

pytestmark = [pytest.mark.container, pytest.mark.slow, pytest.mark.timeout(1200)]

OUR_SERVICES = ("migrate", "trainer", "simulator", "predictor")
# The login roles deploy/postgres/service_roles.sql creates: service -> (role, its secret).
SERVICE_LOGINS = {"predictor": ("sensor_predictor", "predictor_password"),
                  "trainer": ("sensor_trainer", "trainer_password"),
                  "simulator": ("sensor_simulator", "simulator_password")}
HEALTH_INTERVAL = "2s"
STOP_TIMEOUT = 10  # what `docker compose stop` gives a container before its SIGKILL


# -- the stack ----------------------------------------------------------------------------------


@dataclass
class Stack:
    docker: Docker
    image: Image
    pg: PgServer  # the cluster; `postgres` logs in without a password from this machine only
    database: str
    user: str
    password: str
    secret_file_path: Path
    mlflow: MlflowServer
    logs: Path
    logins: dict[str, tuple[str, str, Path]] = field(default_factory=dict)
    """service -> (login role, password, the host file behind its secret)"""
    metrics_port: int = field(default_factory=free_port)
    prefix: str = field(default_factory=lambda: f"sp-tier-{uuid.uuid4().hex[:8]}")
    containers: dict[str, Container] = field(default_factory=dict)

    def service(self, name: str) -> dict[str, Any]:
        return dict(load_compose()["services"][name])

    def environment(self, name: str, shell: dict[str, str], metrics_port: int) -> dict[str, str]:
        """The service's environment as compose resolves it (with these shell variables), its
        pointers at the other containers made local."""
        env = {str(k): interpolate("" if v is None else str(v), shell)
               for k, v in (self.service(name).get("environment") or {}).items()}
        assert env["POSTGRES_HOST"] == "postgres" and env["POSTGRES_PORT"] == "5432", env
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", env
        user, _, secret = self.login(name)
        assert env["POSTGRES_PASSWORD_FILE"] == f"/run/secrets/{secret}", env
        assert (env["POSTGRES_USER"], env["POSTGRES_DB"]) == (user, self.database), env
        env.update({"POSTGRES_HOST": self.pg.host, "POSTGRES_PORT": str(self.pg.port),
                    "MLFLOW_TRACKING_URI": self.mlflow.uri, "METRICS_PORT": str(metrics_port)})
        if "MODEL_SOURCES_ALLOWED" in env:  # the stack's own MLflow is the local one here
            assert env["MODEL_SOURCES_ALLOWED"] == "http://mlflow:5000", env
            env["MODEL_SOURCES_ALLOWED"] = self.mlflow.uri
        return env

    def login(self, name: str) -> tuple[str, str, str]:
        """(role, password, secret name) the service logs in with."""
        if name in self.logins:
            user, password, _ = self.logins[name]
            return user, password, SERVICE_LOGINS[name][1]
        return self.user, self.password, "postgres_password"

    def secret_file(self, source: str) -> Path:
        if source == "postgres_password":
            return self.secret_file_path
        return next(f for n, (_, _, f) in self.logins.items() if SERVICE_LOGINS[n][1] == source)

    @property
    def passwords(self) -> list[str]:
        return [self.password, *(p for _, p, _ in self.logins.values())]

    def run(self, name: str, *, key: str | None = None, metrics_port: int | None = None,
            **shell: str) -> Container:
        """`docker run` of one compose service, as compose would create it."""
        service = self.service(name)
        command = [str(c) for c in service["command"]]
        healthcheck = not (service.get("healthcheck") or {}).get("disable", False)
        mounts = {}
        for secret in service.get("secrets", []):
            source = secret if isinstance(secret, str) else secret["source"]
            target = source if isinstance(secret, str) else secret.get("target", source)
            mounts[self.secret_file(source)] = f"/run/secrets/{target}"
        container = run_container(
            self.docker, f"{self.prefix}-{key or name}", self.image.id, command,
            env=self.environment(name, shell, metrics_port or self.metrics_port),
            restart=str(service.get("restart", "no")), healthcheck=healthcheck, mounts=mounts,
            health_interval=HEALTH_INTERVAL if healthcheck else None)
        self.containers[key or name] = container
        return container

    def run_to_completion(self, name: str, timeout: float) -> Container:
        """A one-shot service: it must exit 0 (compose's service_completed_successfully)."""
        container = self.run(name)
        code = container.wait_exit(timeout)
        assert code == 0, f"{name} exited {code}:\n{container.logs()[-5000:]}"
        return container

    def ready(self, port: int | None = None) -> tuple[int, dict[str, Any]] | None:
        url = f"http://127.0.0.1:{port or self.metrics_port}/ready"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def sql(self, query: str, *args: Any) -> Any:
        """One value, from a connection of the test's own (the cluster's superuser)."""
        async def go() -> Any:
            conn = await self.pg.connect(self.database)
            try:
                return await conn.fetchval(query, *args)
            finally:
                await conn.close()
        return asyncio.run(go())

    def counts(self) -> Any:
        async def go() -> Any:
            conn = await self.pg.connect(self.database)
            try:
                return await tally(conn)
            finally:
                await conn.close()
        return asyncio.run(go())

    def add_backlog(self, n: int) -> None:
        """n readings in one transaction, as a burst from the old system's writers would."""
        async def go() -> None:
            conn = await self.pg.connect(self.database)
            try:
                machine = await conn.fetchval(
                    "INSERT INTO machines (machine_id) VALUES ('tier-burst') ON CONFLICT"
                    " (machine_id) DO UPDATE SET last_seen = now() RETURNING id")
                await conn.execute(
                    'INSERT INTO readings ("timestamp", "values", machine_id)'
                    " SELECT now(), (SELECT jsonb_object_agg(f, round((random() * 2 - 1)"
                    "::numeric, 4)) FROM unnest($1::text[]) AS f WHERE g > 0), $2"
                    " FROM generate_series(1, $3) AS g", FEATURES, machine, n)
            finally:
                await conn.close()
        asyncio.run(go())


def password_cluster(user: str, password: str, database: str) -> PgServer:
    """A throwaway cluster where `user` must give its password (scram-sha-256) over TCP."""
    server = start_cluster()
    assert server.datadir is not None
    (server.datadir / "pg_hba.conf").write_text(
        "local all all trust\n"
        "host all postgres 127.0.0.1/32 trust\n"  # the test's own connections
        "host all all 127.0.0.1/32 scram-sha-256\n")
    pg_ctl(server, "reload")

    async def setup() -> None:
        conn = await server.connect()
        try:
            # migration 0002 creates the worker's role: the owner needs CREATEROLE.
            await conn.execute(f"CREATE ROLE \"{user}\" LOGIN CREATEROLE PASSWORD '{password}'")
            await conn.execute(f'CREATE DATABASE "{database}" OWNER "{user}"')
        finally:
            await conn.close()

    asyncio.run(setup())
    return server


def create_service_roles(pg: PgServer, database: str, passwords: dict[str, str]) -> None:
    """deploy/postgres/service_roles.sql, run by psql as the postgres image's init script runs
    it (a superuser, the passwords as psql variables), before any migration."""
    sql = ROOT / "deploy" / "postgres" / "service_roles.sql"
    variables = [arg for name, value in passwords.items() for arg in ("-v", f"{name}={value}")]
    subprocess.run([pg_bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", *variables,
                    "-h", pg.host, "-p", str(pg.port), "-U", "postgres", "-d", database,
                    "-f", str(sql)], check=True, capture_output=True, text=True, timeout=60)


def compose_mlflow(root: Path, log: Path) -> tuple[MlflowServer, subprocess.Popen[bytes]]:
    """The compose mlflow service's command, its paths, host and port made local."""
    command = [str(c) for c in load_compose()["services"]["mlflow"]["command"]]
    assert command[:2] == ["mlflow", "server"], command
    exe = find_tool("mlflow")
    assert exe is not None, "mlflow not found next to the interpreter or on PATH"
    port = free_port()
    command = with_flag(command, "--backend-store-uri", f"sqlite:///{root}/mlflow.db")
    command = with_flag(command, "--artifacts-destination", str(root / "artifacts"))
    command = with_flag(command, "--host", "127.0.0.1")
    command = with_flag(command, "--port", str(port))
    hosts = flag_value(command, "--allowed-hosts").replace(":5000", f":{port}")
    command = with_flag(command, "--allowed-hosts", hosts)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(root), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION":
           "false"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([exe, *command[1:]], stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, cwd=root)
    store = MlflowServer(f"http://127.0.0.1:{port}", root, proc)

    def healthy() -> bool:
        assert proc.poll() is None, f"mlflow server exited:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{store.uri}/health", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    try:
        wait_until(healthy, 120, "healthy (mlflow server)", interval=0.3)
    except BaseException:
        stop_process(proc)
        raise
    return store, proc


@pytest.fixture(scope="module")
def stack(docker: Docker, image: Image, tier_logs: Path) -> Iterator[Stack]:
    compose_env = {k: interpolate(str(v), {}) for k, v in
                   load_compose()["services"]["migrate"]["environment"].items()}
    user, database = compose_env["POSTGRES_USER"], compose_env["POSTGRES_DB"]
    password = f"pw-{secrets.token_hex(16)}"
    secret_file = tier_logs / "postgres_password.txt"
    secret_file.write_text(password + "\n", encoding="utf-8")
    secret_file.chmod(0o444)  # compose mounts file secrets as they are: uid 10001 reads it
    pg = password_cluster(user, password, database)
    logins = {}
    for service, (role, secret) in SERVICE_LOGINS.items():
        login_password = f"{secret}-{secrets.token_hex(8)}-p@ss"
        path = tier_logs / f"{secret}.txt"
        path.write_text(login_password + "\n", encoding="utf-8")
        path.chmod(0o444)
        logins[service] = (role, login_password, path)
    create_service_roles(pg, database, {secret: p.read_text().rstrip("\n")
                                        for (_, secret), (_, _, p) in
                                        zip(SERVICE_LOGINS.values(), logins.values(),
                                            strict=True)})
    mlflow_root = tier_logs / "mlflow"
    mlflow_root.mkdir()
    mlflow, mlflow_proc = compose_mlflow(mlflow_root, tier_logs / "mlflow.log")
    s = Stack(docker, image, pg, database, user, password, secret_file, mlflow, tier_logs,
              logins)
    try:
        yield s
    finally:
        for key, container in s.containers.items():
            (tier_logs / f"{key}.log").write_text(container.logs())
            container.remove()
        stop_process(mlflow_proc)
        assert pg.datadir is not None
        with contextlib.suppress(subprocess.CalledProcessError):
            pg_ctl(pg, "stop")
        shutil.rmtree(pg.datadir, ignore_errors=True)


def _ready_with_model(stack: Stack, port: int | None = None) -> bool:
    answer = stack.ready(port)
    return bool(answer and answer[0] == 200 and answer[1].get("model_version") is not None)


# -- the scenarios, in order --------------------------------------------------------------------


def test_migrate_applies_the_migrations_the_wheel_carries(stack: Stack) -> None:
    compose = load_compose()
    ours = {name for name, service in compose["services"].items() if "build" in service
            or service.get("image") == compose["services"]["predictor"]["image"]}
    assert ours == set(OUR_SERVICES), f"compose services on our image: {sorted(ours)}"
    migrate = stack.run_to_completion("migrate", timeout=120)
    applied = stack.sql("SELECT array_agg(version ORDER BY version) FROM schema_migrations")
    shipped = sorted(int(p.name[:4]) for p in (ROOT / "migrations").glob("*.sql"))
    assert list(applied) == shipped, migrate.logs()[-3000:]


def test_predictor_is_healthy_once_a_model_is_active(stack: Stack) -> None:
    predictor = stack.run("predictor", LOG_LEVEL="debug")  # batch_scored lines, for later
    state = wait_until(lambda: stack.ready(), 90, "answering /ready",
                       detail=lambda: predictor.logs()[-3000:])
    assert state[0] == 503 and state[1]["model_version"] is None, state
    # The process itself (seen from the host, not from inside) runs as uid/gid 10001.
    status = Path(f"/proc/{predictor.pid()}/status").read_text().splitlines()
    ids = {line.split(":")[0]: line.split()[1:] for line in status
           if line.startswith(("Uid:", "Gid:"))}
    assert ids == {"Uid": ["10001"] * 4, "Gid": ["10001"] * 4}, ids

    # With no model, the image's HEALTHCHECK fails: never healthy.
    def failed_probes() -> int:
        log = (predictor.state().get("Health") or {}).get("Log") or []
        return sum(1 for entry in log if entry["ExitCode"] != 0)

    wait_until(lambda: failed_probes() >= 2, 30, "probed twice")
    assert predictor.health() != "healthy"

    trainer = stack.run_to_completion("trainer", timeout=300)
    assert "version=" in trainer.logs(), trainer.logs()[-2000:]
    assert stack.sql("SELECT count(*) FROM clusters WHERE is_active") == 1
    wait_until(lambda: predictor.health() == "healthy", 60, "healthy",
               detail=lambda: json.dumps(predictor.state().get("Health"))[-2000:])
    assert _ready_with_model(stack)


def test_simulated_readings_are_scored(stack: Stack) -> None:
    simulator = stack.run("simulator")
    wait_until(lambda: (stack.sql("SELECT count(*) FROM predictions") or 0) >= 50, 60,
               "scoring the simulator's readings",
               detail=lambda: simulator.logs()[-2000:] + stack.containers["predictor"]
               .logs()[-2000:])
    assert simulator.running()


def test_the_predictor_session_is_no_superuser_and_cannot_run_programs(stack: Stack) -> None:
    """Seen from inside the database: the predictor's own sessions, their role's attributes, and
    COPY ... TO PROGRAM tried in such a session's role (SET ROLE: what code running in the
    worker could do with its connection)."""
    role = SERVICE_LOGINS["predictor"][0]

    async def check() -> dict[str, Any]:
        conn = await stack.pg.connect(stack.database)
        try:
            sessions = await conn.fetch(
                "SELECT a.usename, a.application_name, r.rolsuper, r.rolcreaterole,"
                "       r.rolcreatedb, r.rolbypassrls,"
                "       pg_has_role(a.usesysid, 'pg_execute_server_program', 'USAGE') AS program,"
                "       pg_has_role(a.usesysid, 'pg_write_server_files', 'USAGE') AS files,"
                "       pg_has_role(a.usesysid, 'sensor_predictor_worker', 'USAGE') AS worker"
                "  FROM pg_stat_activity a JOIN pg_roles r ON r.oid = a.usesysid"
                " WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()")
            async with conn.transaction():
                await conn.execute(f"SET LOCAL ROLE {role}")
                try:
                    await conn.execute("COPY (SELECT 1) TO PROGRAM 'id'")
                    copy = "allowed"
                except asyncpg.InsufficientPrivilegeError as exc:
                    copy = str(exc)
        finally:
            await conn.close()
        # And with the role's own login, as the worker's connection is.
        _, password, _ = stack.login("predictor")
        own = await asyncpg.connect(host=stack.pg.host, port=stack.pg.port, user=role,
                                    password=password, database=stack.database)
        try:
            superuser = await own.fetchval("SELECT current_setting('is_superuser')")
            try:
                await own.execute("COPY (SELECT 1) TO PROGRAM 'id'")
                own_copy = "allowed"
            except asyncpg.InsufficientPrivilegeError as exc:
                own_copy = str(exc)
        finally:
            await own.close()
        return {"sessions": [dict(r) for r in sessions], "copy": copy,
                "own_superuser": superuser, "own_copy": own_copy}

    seen = asyncio.run(check())
    predictor_sessions = [s for s in seen["sessions"] if s["usename"] == role]
    assert predictor_sessions, seen["sessions"]
    # Every other session in the database is a service's own role (none is the owner's).
    assert {s["usename"] for s in seen["sessions"]} <= {role, *(
        r for r, _ in SERVICE_LOGINS.values())}, seen["sessions"]
    for session in predictor_sessions:
        assert session["worker"], session
        assert not any(session[k] for k in ("rolsuper", "rolcreaterole", "rolcreatedb",
                                            "rolbypassrls", "program", "files")), session
    # InsufficientPrivilegeError both times ("must be superuser or have privileges of the
    # pg_execute_server_program role to COPY to or from an external program").
    assert "pg_execute_server_program" in seen["copy"], seen["copy"]
    assert seen["own_superuser"] == "off"
    assert "pg_execute_server_program" in seen["own_copy"], seen["own_copy"]
    REPORT["predictor role"] = (f"{len(predictor_sessions)} sessions as {role}: not superuser, "
                                "COPY ... TO PROGRAM refused")


def _scored(stack: Stack) -> tuple[int, int]:
    """(readings, results): results are predictions plus reading_errors rows."""
    row = stack.sql("SELECT ARRAY[(SELECT count(*) FROM readings), (SELECT count(*) FROM"
                    " predictions) + (SELECT count(*) FROM reading_errors)]")
    return int(row[0]), int(row[1])


def _add_backlog_and_wait_for_the_drain(stack: Stack, n: int = 60_000) -> None:
    """A burst of n readings, and back once the worker is well into it (not merely scoring the
    simulator's readings while the burst's transaction is open: it holds the horizon)."""
    stack.add_backlog(n)
    committed = _scored(stack)[1]

    def draining() -> bool:
        readings, results = _scored(stack)
        return results >= committed + 2_000 and readings - results > 5_000

    wait_until(draining, 60, "draining the burst", interval=0.05)


def test_docker_stop_commits_the_batch_in_flight_and_exits_0_within_5_s(stack: Stack) -> None:
    predictor = stack.containers["predictor"]
    attempts = []
    for _ in range(3):  # a stop that happens to fall between two batches proves less: retry
        seen = len(predictor.events())
        _add_backlog_and_wait_for_the_drain(stack)
        started = time.monotonic()
        stack.docker("stop", "-t", str(STOP_TIMEOUT), predictor.name, timeout=60)
        took = time.monotonic() - started
        state = predictor.state()
        assert state["ExitCode"] == 0 and not state["OOMKilled"], (state, predictor.logs()[-3000:])
        assert took < 5, f"docker stop took {took:.1f} s"
        # Every range it had claimed was committed: no claim is left for an orphan hunt.
        assert stack.sql("SELECT count(*) FROM scoring_claims") == 0
        events = [e.get("event") for e in predictor.events()[seen:]]
        assert "worker_stopped" in events, events[-20:]
        assert "batch_failed" not in events
        after = events[events.index("shutdown_requested"):]
        attempts.append((round(took, 2), after.count("batch_scored")))
        assert stack.counts().duplicated == 0
        predictor.start()
        wait_until(lambda: _ready_with_model(stack), 90, "ready again",
                   detail=lambda: predictor.logs()[-3000:])
        if attempts[-1][1] >= 1:
            break
    REPORT["docker stop"] = ", ".join(f"exit 0 in {t} s, {n} batch(es) committed after SIGTERM"
                                      for t, n in attempts)
    # At least one stop came in the middle of a batch, and that batch was committed.
    assert max(n for _, n in attempts) >= 1, attempts


def test_docker_kill_then_restart_loses_and_doubles_nothing(stack: Stack) -> None:
    predictor = stack.containers["predictor"]
    before = stack.counts()
    _add_backlog_and_wait_for_the_drain(stack)
    stack.docker("kill", predictor.name)  # SIGKILL: no shutdown at all
    state = predictor.state()
    assert not state["Running"] and state["ExitCode"] == 137, state
    left = stack.counts()
    assert left.missing > 0, "the backlog was drained before the kill: nothing was at stake"
    predictor.start()
    # The simulator stops too (SIGTERM, exit 0), so the stream ends and the count is final.
    simulator = stack.containers["simulator"]
    stack.docker("stop", "-t", str(STOP_TIMEOUT), simulator.name, timeout=60)
    assert simulator.state()["ExitCode"] == 0, simulator.logs()[-3000:]
    t = wait_until(lambda: (c := stack.counts()).missing == 0 and c, 180, "all scored",
                   interval=1, detail=lambda: predictor.logs()[-3000:])
    assert t.exactly_once, t  # every reading: exactly one prediction or reading_errors row
    assert t.readings >= before.readings + 60_000
    REPORT["docker kill"] = (f"SIGKILL with {left.missing} readings unscored; after the restart "
                             f"{t.readings} readings, {t.predicted} predicted, {t.errors} errors, "
                             "0 missing, 0 doubled")
    simulator.start()


def test_each_password_comes_from_its_secret_and_is_never_logged(stack: Stack) -> None:
    async def login(user: str, password: str | None) -> str:
        try:
            conn = await asyncpg.connect(host=stack.pg.host, port=stack.pg.port,
                                         user=user, password=password,
                                         database=stack.database)
        except (asyncpg.PostgresError, OSError) as exc:
            return type(exc).__name__
        await conn.close()
        return "ok"

    for name in OUR_SERVICES:
        user, password, secret = stack.login(name)
        # The cluster makes the role give its password: the service logged in with the file's.
        assert asyncio.run(login(user, None)) != "ok"
        assert asyncio.run(login(user, "not-the-password")) == "InvalidPasswordError"
        assert asyncio.run(login(user, password)) == "ok"
        container = stack.containers[name]
        logs = container.logs()
        assert logs.strip(), f"{name} logged nothing"
        for any_password in stack.passwords:
            assert any_password not in logs, f"{name} logs a password"
        config = stack.docker.inspect(container.name)["Config"]
        assert f"POSTGRES_PASSWORD_FILE=/run/secrets/{secret}" in config["Env"]
        assert not [e for e in config["Env"] if e.startswith("POSTGRES_PASSWORD=")]
        for any_password in stack.passwords:
            assert any_password not in json.dumps(config), f"{name}'s config holds a password"
        # Only migrate gets the owner's password.
        mounts = {m["Destination"] for m in stack.docker.inspect(container.name)["Mounts"]}
        assert ("/run/secrets/postgres_password" in mounts) == (name == "migrate"), mounts


def test_cold_start_to_ready(stack: Stack) -> None:
    """A new container of the image (a second replica), with a model active: start to /ready."""
    port = free_port()
    replica = stack.run("predictor", key="predictor-cold", metrics_port=port)
    started = replica.started[-1]
    wait_until(lambda: _ready_with_model(stack, port), 60, "ready within the start period",
               interval=0.05, detail=lambda: replica.logs()[-3000:])
    took = time.monotonic() - started
    REPORT["cold start -> /ready"] = f"{took:.1f} s (docker run to 200 with a model loaded)"
    stack.docker("stop", "-t", str(STOP_TIMEOUT), replica.name, timeout=60)
    assert replica.state()["ExitCode"] == 0


def test_unhealthy_when_postgresql_goes_away_and_healthy_when_it_is_back(stack: Stack) -> None:
    predictor = stack.containers["predictor"]
    wait_until(lambda: predictor.health() == "healthy", 60, "healthy")
    pg_ctl(stack.pg, "stop")
    try:
        wait_until(lambda: predictor.health() == "unhealthy", 60, "unhealthy",
                   detail=lambda: json.dumps(predictor.state().get("Health"))[-2000:])
        assert predictor.running()  # unhealthy, not dead: it waits for the database
        answer = stack.ready()
        assert answer is not None and answer[0] == 503, answer
    finally:
        pg_ctl(stack.pg, "start")
    wait_until(lambda: predictor.health() == "healthy", 90, "healthy again",
               detail=lambda: predictor.logs()[-3000:])
    t = wait_until(lambda: (c := stack.counts()).missing == 0 and c, 60, "all scored",
                   interval=1)
    assert t.exactly_once, t
