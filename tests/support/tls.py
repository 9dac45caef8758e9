"""A TLS-only PostgreSQL (hostssl only in pg_hba, client certificates required) with its own
CA, made with openssl; and a second CA that signed nothing of it."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sensor_predictor.devtools.postgres import (
    SERVER_ACCOUNT,
    PgServer,
    pg_ctl,
    start_cluster,
    stop_cluster,
)

KEY_PASSWORD = "client-key-passphrase"


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {done.stderr[-800:]}")


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, crt = folder / f"{name}.key", folder / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             f"/CN={name}", "-keyout", str(key), "-out", str(crt), cwd=folder)
    return key, crt


def sign(folder: Path, name: str, ca: tuple[Path, Path], subject: str, san: str | None,
         password: str | None = None) -> tuple[Path, Path]:
    """A key and a certificate for `subject` signed by `ca` (SAN: e.g. DNS:localhost)."""
    key, csr, crt = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.crt"
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", str(key),
             "-out", str(csr), cwd=folder)
    ext = folder / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]),
             "-CAcreateserial", "-days", "2", "-out", str(crt), "-extfile", str(ext),
             cwd=folder)
    if password is not None:  # the client key, encrypted
        encrypted = folder / f"{name}.enc.key"
        _openssl("pkey", "-in", str(key), "-out", str(encrypted), "-aes256", "-passout",
                 f"pass:{password}", cwd=folder)
        return encrypted, crt
    return key, crt


@dataclass
class TlsServer:
    server: PgServer
    folder: Path
    ca: Path
    other_ca: Path
    client_cert: Path
    client_key: Path
    key_password_file: Path

    def env(self, database: str, host: str = "localhost", **extra: str) -> dict[str, str]:
        """POSTGRES_* for verify-full with the client certificate (override with `extra`)."""
        return {"POSTGRES_HOST": host, "POSTGRES_PORT": str(self.server.port),
                "POSTGRES_USER": "postgres", "POSTGRES_PASSWORD": "", "POSTGRES_DB": database,
                "POSTGRES_SSLMODE": "verify-full", "POSTGRES_SSLROOTCERT": str(self.ca),
                "POSTGRES_SSLCERT": str(self.client_cert),
                "POSTGRES_SSLKEY": str(self.client_key),
                "POSTGRES_SSLPASSWORD_FILE": str(self.key_password_file), **extra}

    def rotate_server_certificate(self) -> None:
        """A new server key and certificate from the same CA, and a reload (the running
        sessions keep the old one until they are cut)."""
        ca = (self.folder / "ca.key", self.ca)
        key, crt = sign(self.folder, "server2", ca, "/CN=localhost", "DNS:localhost")
        self._install(key, crt)
        pg_ctl(self.server, "reload")

    def _install(self, key: Path, crt: Path) -> None:
        assert self.server.datadir is not None
        for src, dst in ((key, "server.key"), (crt, "server.crt")):
            target = self.server.datadir / dst
            shutil.copy(src, target)
            if os.geteuid() == 0:
                shutil.chown(target, SERVER_ACCOUNT, SERVER_ACCOUNT)
            target.chmod(0o600)

    def stop(self) -> None:
        stop_cluster(self.server)
        shutil.rmtree(self.folder, ignore_errors=True)


def start_tls_server(settings: dict[str, str] | None = None) -> TlsServer:
    folder = Path(tempfile.mkdtemp(prefix="sp-tls-"))
    ca = make_ca(folder, "ca")
    other = make_ca(folder, "other-ca")
    server_key, server_crt = sign(folder, "server", ca, "/CN=localhost", "DNS:localhost")
    client_key, client_crt = sign(folder, "client", ca, "/CN=postgres", None,
                                  password=KEY_PASSWORD)
    password_file = folder / "client-key-password"
    password_file.write_text(KEY_PASSWORD + "\n")
    # Started plain, then given its files in its data directory (owned by its account,
    # 0600), TLS on and a pg_hba of hostssl lines only, and restarted.
    server = _start(settings or {}, folder)
    tls = TlsServer(server, folder, ca[1], other[1], client_crt, client_key, password_file)
    try:
        tls._install(server_key, server_crt)
        assert server.datadir is not None
        root = server.datadir / "root.crt"
        shutil.copy(ca[1], root)
        if os.geteuid() == 0:
            shutil.chown(root, SERVER_ACCOUNT, SERVER_ACCOUNT)
        with open(server.datadir / "postgresql.conf", "a", encoding="utf-8") as f:
            f.write("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
                    "ssl_ca_file = 'root.crt'\n")
        # TLS only, and a client certificate signed by our CA on every connection; the
        # Unix socket stays open to the tests' tools.
        (server.datadir / "pg_hba.conf").write_text(
            "local all all trust\n"
            "hostssl all all 127.0.0.1/32 trust clientcert=verify-ca\n"
            "hostssl all all ::1/128 trust clientcert=verify-ca\n")
        pg_ctl(server, "restart")
    except BaseException:
        tls.stop()
        raise
    return tls


def _start(settings: dict[str, str], folder: Path) -> PgServer:
    return start_cluster({"fsync": "off", "max_connections": "100", **settings},
                         prefix="sp-tls-pg-")
