"""Why a connection failed, in words: what heals by itself, and what a setting must change.

Pure: it looks at the exception only (its type, SQLSTATE, message, TLS verify code). The worker
retries what is `transient` (the server down or restarting, a network cut, a standby not
promoted yet); everything else is a configuration error, named with the variable to change.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass

import asyncpg

# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_NAME_MISMATCH = (62, 64)


@dataclass(frozen=True)
class Cause:
    """A failure, named: `kind` for logs and /ready, `message` a sentence, `variable` what to
    change (None for an outage)."""

    kind: str
    transient: bool
    message: str
    variable: str | None = None

    def line(self) -> str:
        """One line for an operator: the cause and the variable to change."""
        if self.variable is None:
            return self.message
        return f"{self.message} (change {self.variable})"


class ConnectFailed(ConnectionError):
    """No host gave a usable connection; `cause` is the most telling of their failures.

    A ConnectionError (an OSError), so that code retrying on an unreachable database still does;
    a configuration cause is told apart by `cause.transient`.
    """

    def __init__(self, cause: Cause, tried: list[str] | None = None) -> None:
        super().__init__(cause.line())
        self.cause = cause
        self.tried = tried or []


class ListenUnavailable(ConnectFailed):
    """The LISTEN connection cannot be had, or does not hear (a transaction pooler)."""


def config(kind: str, message: str, variable: str) -> Cause:
    return Cause(kind, False, message, variable)


def outage(kind: str, message: str) -> Cause:
    return Cause(kind, True, message)


def _text(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def classify(exc: BaseException, where: str = "") -> Cause:
    """The cause of a failed connection attempt (or of an error on an open connection).

    `where` (host:port) is put in the messages when known.
    """
    at = f" at {where}" if where else ""
    if isinstance(exc, ConnectFailed):
        return exc.cause
    text = _text(exc)
    lowered = text.lower()
    # -- TLS ------------------------------------------------------------------------------
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code in _NAME_MISMATCH or "mismatch" in str(exc.verify_message).lower():
            return config("tls_hostname_mismatch",
                          f"the server certificate{at} does not match the host name "
                          f"({exc.verify_message})", "POSTGRES_HOST or POSTGRES_SSLMODE")
        return config("tls_certificate_not_trusted",
                      f"the server certificate{at} does not verify against the root "
                      f"certificate ({exc.verify_message})", "POSTGRES_SSLROOTCERT")
    if isinstance(exc, asyncpg.ClientConfigurationError) and "root certificate" in lowered:
        path = re.search(r'"([^"]+)"', text)
        return config("tls_root_cert_missing",
                      f"the root certificate file {path[1] if path else ''} does not exist or "
                      "cannot be read".replace("  ", " "), "POSTGRES_SSLROOTCERT")
    if isinstance(exc, ConnectionError) and "rejected ssl upgrade" in lowered:
        return config("tls_not_offered",
                      f"the server{at} does not offer TLS, and POSTGRES_SSLMODE requires it",
                      "POSTGRES_SSLMODE")
    if isinstance(exc, ssl.SSLError):
        return config("tls_failed", f"TLS with the server{at} failed: {text}",
                      "POSTGRES_SSLMODE / POSTGRES_SSLCERT / POSTGRES_SSLKEY")
    if isinstance(exc, asyncpg.ClientConfigurationError):
        return config("client_configuration", f"invalid connection settings: {text}",
                      "the POSTGRES_* settings")
    # -- what a server or a pooler refuses ------------------------------------------------
    if "unsupported startup parameter" in lowered:
        return config("startup_parameter_refused",
                      f"the server{at} (a pooler) refused a startup parameter: {text}",
                      "PgBouncer's ignore_startup_parameters, or POSTGRES_HOST/POSTGRES_PORT")
    if isinstance(exc, asyncpg.InvalidPasswordError) or "authentication failed" in lowered:
        return config("login_refused", f"the server{at} refused the login: {text}",
                      "POSTGRES_PASSWORD / POSTGRES_PASSWORD_FILE or POSTGRES_USER")
    if re.search(r'role ".*" does not exist', lowered):
        return config("unknown_role", f"the server{at} has no such role: {text}",
                      "POSTGRES_USER")
    if re.search(r'database ".*" does not exist', lowered):
        return config("unknown_database", f"the server{at} has no such database: {text}",
                      "POSTGRES_DB")
    if "client certificate" in lowered:
        return config("tls_client_certificate",
                      f"the server{at} requires a valid client certificate: {text}",
                      "POSTGRES_SSLCERT / POSTGRES_SSLKEY / POSTGRES_SSLPASSWORD_FILE")
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError) or "pg_hba" in lowered:
        if "pg_hba" in lowered and "no encryption" in lowered:
            return config("tls_required",
                          f"the server{at} requires TLS (its pg_hba.conf has no entry for an "
                          "unencrypted connection)", "POSTGRES_SSLMODE (require or verify-full)")
        if "pg_hba" in lowered:
            return config("login_not_allowed",
                          f"the server{at} does not allow this login (pg_hba.conf): {text}",
                          "POSTGRES_USER / POSTGRES_DB, or the server's pg_hba.conf")
        return config("login_refused", f"the server{at} refused the login: {text}",
                      "POSTGRES_USER / POSTGRES_PASSWORD")
    if isinstance(exc, asyncpg.InvalidCatalogNameError) or "no such database" in lowered:
        return config("unknown_database", f"the server{at} has no such database: {text}",
                      "POSTGRES_DB")
    if "no such user" in lowered:  # PgBouncer without the role in its auth_file
        return config("unknown_role", f"the pooler{at} has no such user: {text}",
                      "POSTGRES_USER, or the pooler's auth_file")
    if isinstance(exc, asyncpg.InvalidSQLStatementNameError) and "__asyncpg_stmt" in text:
        return config("transaction_pooler",
                      f"a prepared statement vanished between two statements{at}: a "
                      "transaction-mode pooler is in between", "POSTGRES_POOL_MODE=transaction")
    # -- what heals by itself -------------------------------------------------------------
    if isinstance(exc, asyncpg.TargetServerAttributeNotMatched):
        return outage("not_primary",
                      f"the server{at} is read-only or a standby (POSTGRES_TARGET_SESSION_ATTRS"
                      " skips it): waiting for a primary")
    if isinstance(exc, asyncpg.ReadOnlySQLTransactionError):
        return outage("not_primary", f"the server{at} is read-only (demoted?): {text}")
    if isinstance(exc, asyncpg.CannotConnectNowError):
        return outage("server_starting", f"the server{at} is starting or stopping: {text}")
    if isinstance(exc, asyncpg.TooManyConnectionsError):
        return outage("too_many_connections", f"the server{at} has no free connection: {text}")
    if isinstance(exc, TimeoutError):
        return outage("timeout", f"no answer from the server{at} in time")
    if isinstance(exc, OSError):
        return outage("unreachable", f"the server{at} cannot be reached: {text}")
    return outage("unavailable", f"the server{at} is unavailable: {type(exc).__name__}: {text}")


def pick(causes: list[Cause]) -> Cause:
    """Of several hosts' failures, the one to report: a configuration error over an outage
    (a host that refused our login says more than a host that was down)."""
    for cause in causes:
        if not cause.transient:
            return cause
    return causes[-1]
