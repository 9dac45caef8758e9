"""Connection settings (host lists, ports, TLS, the listen connection) and the classifier of
connection failures: pure, no server."""

from __future__ import annotations

import ssl
from pathlib import Path

import asyncpg
import pytest

from sensor_predictor.config import ConfigError, load_settings
from sensor_predictor.connect_errors import ConnectFailed, classify, config, outage, pick


def test_one_host_one_port_by_default() -> None:
    s = load_settings({})
    assert s.endpoints == [("localhost", 5432)]
    assert s.listen_endpoints == s.endpoints and not s.listen_is_separate
    assert (s.sslmode, s.target_session_attrs, s.poll_only) == ("prefer", "read-write", False)


def test_a_host_list_with_one_port_or_one_each() -> None:
    assert load_settings({"POSTGRES_HOST": "a, b", "POSTGRES_PORT": "6432"}).endpoints == [
        ("a", 6432), ("b", 6432)]
    s = load_settings({"POSTGRES_HOST": "a,b", "POSTGRES_PORT": "5432,5433"})
    assert s.endpoints == [("a", 5432), ("b", 5433)]
    kwargs = s.connect_kwargs()
    assert (kwargs["host"], kwargs["port"]) == (["a", "b"], [5432, 5433])
    assert kwargs["target_session_attrs"] == "read-write"


def test_a_port_list_of_another_length_is_refused() -> None:
    with pytest.raises(ConfigError, match="POSTGRES_PORT='1,2,3': 3 ports for 2 hosts"):
        load_settings({"POSTGRES_HOST": "a,b", "POSTGRES_PORT": "1,2,3"})
    with pytest.raises(ConfigError, match="POSTGRES_HOST"):
        load_settings({"POSTGRES_HOST": "a,,b"})


def test_the_listen_connection_defaults_to_the_main_host_and_port() -> None:
    s = load_settings({"POSTGRES_HOST": "pooler", "POSTGRES_PORT": "6432",
                       "POSTGRES_LISTEN_HOST": "db"})
    assert s.listen_endpoints == [("db", 6432)] and s.listen_is_separate
    s = load_settings({"POSTGRES_HOST": "pooler", "POSTGRES_PORT": "6432",
                       "POSTGRES_LISTEN_PORT": "5432"})
    assert s.listen_endpoints == [("pooler", 5432)]


def test_postgres_variables_win_over_libpq_ones(tmp_path: Path) -> None:
    s = load_settings({"PGSSLMODE": "require", "PGSSLROOTCERT": "/ca.pem"})
    assert (s.sslmode, s.sslrootcert) == ("require", "/ca.pem")
    s = load_settings({"PGSSLMODE": "require", "POSTGRES_SSLMODE": "verify-full",
                       "PGTARGETSESSIONATTRS": "any"})
    assert (s.sslmode, s.target_session_attrs) == ("verify-full", "any")
    assert s.verifies_server
    with pytest.raises(ConfigError, match="POSTGRES_SSLMODE='verify_full'"):
        load_settings({"POSTGRES_SSLMODE": "verify_full"})
    with pytest.raises(ConfigError, match="PGSSLMODE='sure'"):
        load_settings({"PGSSLMODE": "sure"})


def test_the_key_password_comes_from_a_file_and_never_prints(tmp_path: Path) -> None:
    secret = tmp_path / "key-password"
    secret.write_text("k3y-s3cret\n")
    s = load_settings({"POSTGRES_SSLPASSWORD_FILE": str(secret), "POSTGRES_SSLMODE": "require"})
    assert s.sslpassword is not None and s.sslpassword.reveal() == "k3y-s3cret"
    assert "k3y-s3cret" not in repr(s) and "k3y-s3cret" not in str(s.describe())
    assert "sslpassword=k3y-s3cret" in s.connect_kwargs()["dsn"]
    with pytest.raises(ConfigError, match="POSTGRES_SSLPASSWORD_FILE"):
        load_settings({"POSTGRES_SSLPASSWORD_FILE": str(tmp_path / "missing")})


@pytest.mark.parametrize(("exc", "kind", "transient", "variable"), [
    (asyncpg.ProtocolViolationError("unsupported startup parameter: jit"),
     "startup_parameter_refused", False, "ignore_startup_parameters"),
    (asyncpg.InvalidPasswordError('password authentication failed for user "u"'),
     "login_refused", False, "POSTGRES_PASSWORD"),
    (asyncpg.ProtocolViolationError("password authentication failed"),  # PgBouncer's words
     "login_refused", False, "POSTGRES_PASSWORD"),
    (asyncpg.InvalidAuthorizationSpecificationError('role "nobody" does not exist'),
     "unknown_role", False, "POSTGRES_USER"),
    (asyncpg.InvalidAuthorizationSpecificationError(
        'no pg_hba.conf entry for host "127.0.0.1", user "u", database "d", no encryption'),
     "tls_required", False, "POSTGRES_SSLMODE"),
    (asyncpg.InvalidAuthorizationSpecificationError(
        'no pg_hba.conf entry for host "10.0.0.9", user "u", database "d", SSL encryption'),
     "login_not_allowed", False, "pg_hba.conf"),
    (asyncpg.InvalidCatalogNameError('database "nope" does not exist'),
     "unknown_database", False, "POSTGRES_DB"),
    (asyncpg.ProtocolViolationError("no such database: nope"),
     "unknown_database", False, "POSTGRES_DB"),
    (ConnectionError('PostgreSQL server at "h:5432" rejected SSL upgrade'),
     "tls_not_offered", False, "POSTGRES_SSLMODE"),
    (asyncpg.ClientConfigurationError('root certificate file "/x/ca.pem" does not exist or '
                                      "cannot be accessed"),
     "tls_root_cert_missing", False, "POSTGRES_SSLROOTCERT"),
    (ConnectionRefusedError(111, "Connect call failed"), "unreachable", True, None),
    (TimeoutError(), "timeout", True, None),
    (asyncpg.CannotConnectNowError("the database system is starting up"),
     "server_starting", True, None),
    (asyncpg.TooManyConnectionsError("sorry, too many clients already"),
     "too_many_connections", True, None),
    (asyncpg.TargetServerAttributeNotMatched("none match read-write"), "not_primary", True,
     None),
])
def test_each_failure_is_named(exc: BaseException, kind: str, transient: bool,
                               variable: str | None) -> None:
    cause = classify(exc, "h:5432")
    assert (cause.kind, cause.transient) == (kind, transient), cause
    if variable is None:
        assert cause.variable is None
    else:
        assert cause.variable is not None and variable in cause.variable
        assert variable in cause.line()


def test_tls_verification_failures_are_told_apart() -> None:
    mismatch = ssl.SSLCertVerificationError("certificate verify failed")
    mismatch.verify_code, mismatch.verify_message = 62, "Hostname mismatch"
    untrusted = ssl.SSLCertVerificationError("certificate verify failed")
    untrusted.verify_code, untrusted.verify_message = 20, "unable to get local issuer certificate"
    assert classify(mismatch).kind == "tls_hostname_mismatch"
    assert classify(untrusted).kind == "tls_certificate_not_trusted"
    assert "POSTGRES_SSLROOTCERT" in classify(untrusted).line()


def test_a_configuration_error_outweighs_an_outage_of_another_host() -> None:
    down = outage("unreachable", "a is down")
    refused = config("login_refused", "b refused", "POSTGRES_PASSWORD")
    assert pick([down, refused]) is refused and pick([down]) is down
    assert classify(ConnectFailed(refused)) is refused
    assert isinstance(ConnectFailed(refused), OSError)  # retried where outages are
