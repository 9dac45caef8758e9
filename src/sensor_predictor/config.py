"""Settings from the environment: the old service's variable names and defaults, plus ours."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

T = TypeVar("T")


class ConfigError(ValueError):
    """An environment variable holds a value the service cannot use."""


class Secret:
    """A string that never shows itself in a repr, a log line or a traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Settings:
    """Everything the worker and the commands read from the environment."""

    mlflow_tracking_uri: str = "http://mlflow:5000"
    postgres_host: str = "localhost"
    postgres_port: int = 5432
    postgres_user: str = "sensor_user"
    postgres_password: Secret = field(default_factory=lambda: Secret("sensor_password"))
    postgres_db: str = "sensor_data"
    # Several hosts (POSTGRES_HOST=a,b): one port for all (postgres_port), or one each.
    postgres_ports: tuple[int, ...] = ()
    # libpq's target_session_attrs: a standby or a demoted (read-only) primary is skipped.
    target_session_attrs: str = "read-write"
    # Seconds one host gets to answer, authenticate and pass the target_session_attrs check.
    connect_timeout: float = 5.0
    # TLS, named as libpq names it (POSTGRES_* win over PGSSLMODE, PGSSLROOTCERT, ...).
    sslmode: str = "prefer"
    sslrootcert: str | None = None
    sslcert: str | None = None
    sslkey: str | None = None
    sslpassword: Secret | None = None
    # The LISTEN connection's server (transaction mode: the server itself or a session pool);
    # empty: the main host(s) and port(s).
    listen_host: str = ""
    listen_port: int | None = None
    # No LISTEN at all: wake-ups every INFERENCE_INTERVAL_SECONDS only (documented, explicit).
    poll_only: bool = False
    prediction_batch_size: int = 100
    inference_interval_seconds: float = 30.0
    drift_threshold: float = 0.1
    drift_detection_window: int = 100
    # A drift event also needs the window's counts to be this unlikely under the reference
    # (G-test p-value); 1.0 turns the rule off. README: Drift, for the default.
    drift_p_value: float = 0.001
    metrics_port: int = 8001
    # Ours, beyond the old service's.
    metrics_host: str = "0.0.0.0"
    drift_exit_threshold: float | None = None  # None: 0.75 x drift_threshold
    # Per-feature drift opens an event when a feature's window mean moves more than this many
    # training standard deviations (and significantly: docs/drift.md); 0 turns it off.
    feature_drift_threshold: float = 0.5
    # The outlier rule opens an event when more than this share of the window lies beyond the
    # training 99th percentile distance (and significantly); 1 turns it off.
    outlier_share_threshold: float = 0.05
    # Lanes: batches in flight per worker. A caught-up wake-up uses one (the others join only
    # when it is behind, worker.py), so the rest cost nothing at rest: the pool opens their
    # connections when they join. Draining 1M waiting readings, alternated in one bench run:
    # 2 lanes 0.91/0.92 x the COPY ceiling, 3 lanes 0.94/0.95 x, 4 lanes 1.01/1.01 x (while one
    # lane's batch waits on its commit's flush, the others claim and score).
    prediction_concurrency: int = 4
    heartbeat_seconds: float = 3.0
    # A claim is taken over at once when its worker's session ends; this is the fallback for a
    # half-open session the server has not noticed yet (its claim is then scored twice, written
    # once).
    claim_orphan_seconds: float = 60.0
    # What sits between us and PostgreSQL: "session" (a direct connection, or a session-mode
    # pooler: a session is the worker's own) or "transaction" (a transaction-mode pooler: no
    # session state survives a transaction, so claims are owned by leases, not session locks).
    pool_mode: str = "session"
    # In transaction mode, a claim whose owner stopped renewing its lease for this long is
    # taken over.
    claim_lease_seconds: float = 5.0
    model_name: str = "sensor_failure_clustering"
    migrate_on_start: bool = True
    log_level: str = "info"
    log_format: str = "auto"
    # Verified models kept for a restart without MLflow; "off" keeps none. "~" is expanded.
    model_cache_dir: str = "~/.cache/sensor-predictor"
    # Where models may be read from (model_sources.py): tracking and artifact URI prefixes.
    # Empty: the tracking URI itself (and a local store's folder), nothing else.
    model_sources_allowed: tuple[str, ...] = ()
    # Faults (docs/faults.md). SIGTERM to exit, whatever is stuck: below Docker's 10 s.
    shutdown_grace_seconds: float = 8.0
    # /ready fails once the active model has differed from the served one this long.
    model_mismatch_ready_seconds: float = 60.0
    # A standby fetch process (model_fetch.Standby) starts this long after the first model;
    # None ("off", the default): none, the worker and its fetches stay small (docs/how-it-works).
    fetch_standby_delay_seconds: float | None = None
    # A replica waits this long for another one's migration before it gives up (exit 1).
    migration_wait_seconds: float = 300.0

    @property
    def drift_exit_level(self) -> float:
        if self.drift_exit_threshold is not None:
            return self.drift_exit_threshold
        return 0.75 * self.drift_threshold

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        """The (host, port) pairs of POSTGRES_HOST / POSTGRES_PORT, in order."""
        return _endpoints(self.postgres_host, self.postgres_ports or (self.postgres_port,))

    @property
    def listen_endpoints(self) -> list[tuple[str, int]]:
        """Where the LISTEN connection goes: POSTGRES_LISTEN_HOST / _PORT, else the main ones."""
        hosts = self.listen_host or self.postgres_host
        if self.listen_port is not None:
            return _endpoints(hosts, (self.listen_port,))
        if not self.listen_host:
            return self.endpoints
        return _endpoints(hosts, (self.postgres_port,))

    @property
    def listen_is_separate(self) -> bool:
        return self.listen_endpoints != self.endpoints

    @property
    def verifies_server(self) -> bool:
        """Whether the server's certificate is checked against a CA (verify-ca, verify-full)."""
        return self.sslmode in ("verify-ca", "verify-full")

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for asyncpg.connect / create_pool (the password stays out of DSNs):
        every host and port, target_session_attrs, and the TLS settings (as libpq parameters in
        a DSN without host or credentials, so that asyncpg builds its TLS context from ours)."""
        hosts = self.endpoints
        tls = {"sslmode": self.sslmode, "sslrootcert": self.sslrootcert,
               "sslcert": self.sslcert, "sslkey": self.sslkey}
        query = "&".join(f"{k}={quote(v, safe='')}" for k, v in tls.items() if v)
        kwargs: dict[str, Any] = {
            "dsn": f"postgresql://?{query}",
            "host": [h for h, _ in hosts] if len(hosts) > 1 else hosts[0][0],
            "port": [p for _, p in hosts] if len(hosts) > 1 else hosts[0][1],
            "user": self.postgres_user,
            "password": self.postgres_password.reveal(),
            "database": self.postgres_db,
            "target_session_attrs": self.target_session_attrs,
        }
        if self.sslpassword is not None:
            kwargs["dsn"] += "&sslpassword=" + quote(self.sslpassword.reveal(), safe="")
        return kwargs

    def secret_values(self) -> list[str]:
        """The values no log line may carry (logging_setup masks them wherever they appear):
        the PostgreSQL password and the credentials of the tracking URI."""
        from sensor_predictor.logging_setup import url_credentials

        values = [self.postgres_password.reveal(), *url_credentials(self.mlflow_tracking_uri)]
        if self.sslpassword is not None:
            values.append(self.sslpassword.reveal())
        return values

    def describe(self) -> dict[str, Any]:
        """The settings as loggable fields, secrets masked."""
        return {f.name: repr(v) if isinstance(v, Secret) else v
                for f in fields(self) for v in [getattr(self, f.name)]}


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("must be a TCP port, 0-65535")
    return value


def _ports(raw: str) -> tuple[int, ...]:
    parts = [p.strip() for p in raw.split(",")]
    if not all(parts):
        raise ValueError("must be a TCP port, or a comma-separated list of them")
    return tuple(_port(p) for p in parts)


def _hosts(raw: str) -> str:
    parts = [h.strip() for h in raw.split(",")]
    if not all(parts):
        raise ValueError("must be a host name, or a comma-separated list of them")
    return ",".join(parts)


def _endpoints(hosts_text: str, ports: tuple[int, ...]) -> list[tuple[str, int]]:
    hosts = [h.strip() for h in hosts_text.split(",")]
    if len(ports) == 1:
        return [(h, ports[0]) for h in hosts]
    return list(zip(hosts, ports, strict=True))


SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
TARGET_SESSION_ATTRS = ("any", "read-write", "read-only", "primary", "standby",
                        "prefer-standby")


def _sslmode(raw: str) -> str:
    lowered = raw.strip().lower()
    if lowered not in SSLMODES:
        raise ValueError("must be one of " + ", ".join(SSLMODES))
    return lowered


def _target_session_attrs(raw: str) -> str:
    lowered = raw.strip().lower()
    if lowered not in TARGET_SESSION_ATTRS:
        raise ValueError("must be one of " + ", ".join(TARGET_SESSION_ATTRS))
    return lowered


def _path(raw: str) -> str:
    if not raw.strip():
        raise ValueError("must be a file path")
    return str(Path(raw.strip()).expanduser())


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a positive, finite number of seconds")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not (value >= 0 and value != float("inf")):
        raise ValueError("must be a number >= 0")
    return value


def _off_or_seconds(raw: str) -> float | None:
    if raw.strip().lower() == "off":
        return None
    return _non_negative_float(raw)


def _unit_interval(raw: str) -> float:
    value = float(raw)
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be between 0 and 1")
    return value


def _p_value(raw: str) -> float:
    value = float(raw)
    if not 0.0 < value <= 1.0:
        raise ValueError("must be in (0, 1]")
    return value


def _boolean(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("must be true or false")


def _non_empty(raw: str) -> str:
    if not raw.strip():
        raise ValueError("must not be empty")
    return raw


def _log_level(raw: str) -> str:
    lowered = raw.strip().lower()
    if lowered not in {"debug", "info", "warning", "error"}:
        raise ValueError("must be one of debug, info, warning, error")
    return lowered


def _pool_mode(raw: str) -> str:
    lowered = raw.strip().lower()
    if lowered not in {"session", "transaction"}:
        raise ValueError("must be session or transaction")
    return lowered


def _log_format(raw: str) -> str:
    lowered = raw.strip().lower()
    if lowered not in {"auto", "json", "console"}:
        raise ValueError("must be one of auto, json, console")
    return lowered


def _cache_dir(raw: str) -> str:
    if not raw.strip():
        raise ValueError("must be a folder, or off")
    return "off" if raw.strip().lower() == "off" else raw


def _uri_list(raw: str) -> tuple[str, ...]:
    """Comma- or blank-separated URI prefixes; empty: the default."""
    items = tuple(part for part in raw.replace(",", " ").split() if part)
    for item in items:
        if item in ("*", "/", "file:///", "file://", "http://", "https://"):
            raise ValueError(f"{item!r} would allow everything; name the locations")
    return items


# environment variable -> (settings field, parser)
_VARIABLES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "MLFLOW_TRACKING_URI": ("mlflow_tracking_uri", _non_empty),
    "POSTGRES_HOST": ("postgres_host", _hosts),
    "POSTGRES_PORT": ("postgres_ports", _ports),
    "POSTGRES_USER": ("postgres_user", _non_empty),
    "POSTGRES_DB": ("postgres_db", _non_empty),
    "PREDICTION_BATCH_SIZE": ("prediction_batch_size", _positive_int),
    "INFERENCE_INTERVAL_SECONDS": ("inference_interval_seconds", _positive_float),
    "DRIFT_THRESHOLD": ("drift_threshold", _unit_interval),
    "DRIFT_DETECTION_WINDOW": ("drift_detection_window", _positive_int),
    "DRIFT_P_VALUE": ("drift_p_value", _p_value),
    "METRICS_PORT": ("metrics_port", _port),
    "METRICS_HOST": ("metrics_host", _non_empty),
    "DRIFT_EXIT_THRESHOLD": ("drift_exit_threshold", _unit_interval),
    "FEATURE_DRIFT_THRESHOLD": ("feature_drift_threshold", _non_negative_float),
    "OUTLIER_SHARE_THRESHOLD": ("outlier_share_threshold", _unit_interval),
    "PREDICTION_CONCURRENCY": ("prediction_concurrency", _positive_int),
    "HEARTBEAT_SECONDS": ("heartbeat_seconds", _positive_float),
    "CLAIM_ORPHAN_SECONDS": ("claim_orphan_seconds", _positive_float),
    "POSTGRES_POOL_MODE": ("pool_mode", _pool_mode),
    "CLAIM_LEASE_SECONDS": ("claim_lease_seconds", _positive_float),
    "MODEL_NAME": ("model_name", _non_empty),
    "MIGRATE_ON_START": ("migrate_on_start", _boolean),
    "LOG_LEVEL": ("log_level", _log_level),
    "LOG_FORMAT": ("log_format", _log_format),
    "MODEL_CACHE_DIR": ("model_cache_dir", _cache_dir),
    "MODEL_SOURCES_ALLOWED": ("model_sources_allowed", _uri_list),
    "POSTGRES_TARGET_SESSION_ATTRS": ("target_session_attrs", _target_session_attrs),
    "POSTGRES_CONNECT_TIMEOUT": ("connect_timeout", _positive_float),
    "POSTGRES_SSLMODE": ("sslmode", _sslmode),
    "POSTGRES_SSLROOTCERT": ("sslrootcert", _path),
    "POSTGRES_SSLCERT": ("sslcert", _path),
    "POSTGRES_SSLKEY": ("sslkey", _path),
    "POSTGRES_LISTEN_HOST": ("listen_host", _hosts),
    "POSTGRES_LISTEN_PORT": ("listen_port", _port),
    "POLL_ONLY": ("poll_only", _boolean),
    "SHUTDOWN_GRACE_SECONDS": ("shutdown_grace_seconds", _positive_float),
    "MODEL_MISMATCH_READY_SECONDS": ("model_mismatch_ready_seconds", _positive_float),
    "MIGRATION_WAIT_SECONDS": ("migration_wait_seconds", _positive_float),
    "FETCH_STANDBY_DELAY_SECONDS": ("fetch_standby_delay_seconds", _off_or_seconds),
}

# libpq's own variables, read when the POSTGRES_* one is not set (POSTGRES_* win).
_LIBPQ_FALLBACKS: dict[str, str] = {
    "POSTGRES_SSLMODE": "PGSSLMODE",
    "POSTGRES_SSLROOTCERT": "PGSSLROOTCERT",
    "POSTGRES_SSLCERT": "PGSSLCERT",
    "POSTGRES_SSLKEY": "PGSSLKEY",
    "POSTGRES_TARGET_SESSION_ATTRS": "PGTARGETSESSIONATTRS",
    "POSTGRES_CONNECT_TIMEOUT": "PGCONNECT_TIMEOUT",
}


def _read_secret_file(environ: Mapping[str, str], name: str) -> Secret | None:
    path = environ.get(name)
    if not path:
        return None
    try:
        return Secret(Path(path).read_text(encoding="utf-8").rstrip("\r\n"))
    except OSError as exc:
        raise ConfigError(f"{name}={path!r} cannot be read: {exc.strerror}") from None


def _read_password(environ: Mapping[str, str]) -> Secret | None:
    path = environ.get("POSTGRES_PASSWORD_FILE")
    if path:
        try:
            # Secret files usually end with a newline that is not part of the password.
            return Secret(Path(path).read_text(encoding="utf-8").rstrip("\r\n"))
        except OSError as exc:
            raise ConfigError(
                f"POSTGRES_PASSWORD_FILE={path!r} cannot be read: {exc.strerror}") from None
    if "POSTGRES_PASSWORD" in environ:
        return Secret(environ["POSTGRES_PASSWORD"])
    return None


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read the settings; every invalid value is reported at once in one ConfigError."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    problems: list[str] = []
    for name, (attr, parse) in _VARIABLES.items():
        raw = env.get(name)
        if raw is None and name in _LIBPQ_FALLBACKS:
            name = _LIBPQ_FALLBACKS[name]
            raw = env.get(name)
        if raw is None:
            continue
        try:
            values[attr] = parse(raw)
        except ValueError as exc:
            reason = str(exc) if parse not in (int, float) else "not a number"
            if "invalid literal" in reason or "could not convert" in reason:
                reason = "not a number"
            problems.append(f"{name}={raw!r}: {reason}")
    try:
        password = _read_password(env)
    except ConfigError as exc:
        problems.append(str(exc))
        password = None
    if password is not None:
        values["postgres_password"] = password
    try:
        sslpassword = _read_secret_file(env, "POSTGRES_SSLPASSWORD_FILE")
    except ConfigError as exc:
        problems.append(str(exc))
        sslpassword = None
    if sslpassword is not None:
        values["sslpassword"] = sslpassword
    ports = values.pop("postgres_ports", None)
    if ports is not None:
        values["postgres_port"] = ports[0]
        hosts = values.get("postgres_host", Settings.postgres_host).split(",")
        if len(ports) > 1:
            if len(ports) != len(hosts):
                problems.append(
                    f"POSTGRES_PORT={env.get('POSTGRES_PORT')!r}: {len(ports)} ports for "
                    f"{len(hosts)} hosts in POSTGRES_HOST (one port for all, or one per host)")
            else:
                values["postgres_ports"] = ports
    if not problems:
        threshold = values.get("drift_threshold", Settings.drift_threshold)
        exit_level = values.get("drift_exit_threshold")
        if exit_level is not None and exit_level > threshold:
            problems.append(
                f"DRIFT_EXIT_THRESHOLD={exit_level} must not exceed DRIFT_THRESHOLD={threshold}"
            )
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))
    return Settings(**values)
