"""A real PgBouncer (Debian's /usr/sbin/pgbouncer) in front of a test cluster, on a free port,
with a server pool smaller than its clients: backends really are shared."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sensor_predictor.devtools.postgres import SERVER_ACCOUNT, PgServer, free_port, port_answers

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


@dataclass
class PgBouncer:
    host: str
    port: int
    mode: str
    folder: Path
    proc: subprocess.Popen[bytes]

    def env(self, database: str) -> dict[str, str]:
        """The worker's POSTGRES_* environment through this pooler."""
        return {"POSTGRES_HOST": self.host, "POSTGRES_PORT": str(self.port),
                "POSTGRES_USER": "postgres", "POSTGRES_PASSWORD": "", "POSTGRES_DB": database}

    def log(self) -> str:
        path = self.folder / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            pidfile = self.folder / "pgbouncer.pid"
            try:  # SIGTERM: immediate shutdown (to PgBouncer itself, not runuser)
                os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.folder, ignore_errors=True)


def start_pgbouncer(server: PgServer, mode: str, pool_size: int = 2,
                    users: tuple[str, ...] = ("postgres",),
                    settings: dict[str, str] | None = None) -> PgBouncer:
    """PgBouncer in `mode` (session | transaction) in front of `server`, every database, trust
    authentication for `users`, `pool_size` server connections per database and user, and
    `settings` (pgbouncer.ini names) on top."""
    if not Path(PGBOUNCER).exists():
        raise RuntimeError("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    folder = Path(tempfile.mkdtemp(prefix=f"sp-pgbouncer-{mode}-"))
    port = free_port()
    (folder / "users.txt").write_text("".join(f'"{u}" ""\n' for u in users))
    (folder / "pgbouncer.ini").write_text(f"""\
[databases]
* = host={server.host} port={server.port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {folder}/users.txt
admin_users = postgres
pool_mode = {mode}
default_pool_size = {pool_size}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 500
server_reset_query = DISCARD ALL
server_check_delay = 1
query_wait_timeout = 60
logfile = {folder}/pgbouncer.log
pidfile = {folder}/pgbouncer.pid
""" + "".join(f"{k} = {v}\n" for k, v in (settings or {}).items()))
    run_as: list[str] = []
    if os.geteuid() == 0:  # PgBouncer refuses to run as root
        shutil.chown(folder, SERVER_ACCOUNT, SERVER_ACCOUNT)
        for f in folder.iterdir():
            shutil.chown(f, SERVER_ACCOUNT, SERVER_ACCOUNT)
        run_as = [shutil.which("runuser") or "/usr/sbin/runuser", "-u", SERVER_ACCOUNT, "--"]
    proc = subprocess.Popen([*run_as, PGBOUNCER, str(folder / "pgbouncer.ini")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    bouncer = PgBouncer("127.0.0.1", port, mode, folder, proc)
    deadline = time.monotonic() + 15
    while not port_answers("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            text = bouncer.log()
            bouncer.stop()
            raise RuntimeError(f"pgbouncer did not start: {text[-1500:]}")
        time.sleep(0.05)
    return bouncer
