"""A real `mlflow server` process (as compose.yaml runs it), for tests and development.

    server = start_mlflow_server(root)       # sqlite store and artifacts under root
    ... MLFLOW_TRACKING_URI=server.uri ...
    server.stop(); server.start()            # the same port and store again

    server = launch_mlflow_server(root)      # started, not waited for (its start takes 5-10 s
    ...                                      # of importing MLflow: do something else)
    server.wait_healthy()
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sensor_predictor.devtools.postgres import free_port

__all__ = ["MlflowServer", "launch_mlflow_server", "mlflow_env", "start_mlflow_server",
           "stop_process"]

# On a loaded 2-core machine a start has taken more than 60 s.
HEALTH_TIMEOUT = 180.0


def mlflow_env(uri: str) -> dict[str, str]:
    """The worker's MLflow environment: `uri`, and failing fast when it does not answer."""
    return {"MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10) -> int | None:
    """SIGTERM to the process group (start_new_session), SIGKILL after `timeout`."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return proc.returncode


@dataclass
class MlflowServer:
    """A tracking store at `uri` with its files under `root`; `process` when we run a server
    (None for a plain sqlite store used in-process)."""

    uri: str
    root: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def start(self, timeout: float = HEALTH_TIMEOUT) -> float:
        """Start it again on the same port and store; the seconds until /health answered."""
        started = time.monotonic()
        port = int(self.uri.rsplit(":", 1)[1])
        self.process = start_mlflow_server(self.root, port=port, timeout=timeout).process
        return time.monotonic() - started

    def wait_healthy(self, timeout: float = HEALTH_TIMEOUT) -> MlflowServer:
        """Until /health answers (the process stopped, and an error, if it does not in time)."""
        assert self.process is not None, "no server process: a plain sqlite store"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = (self.root / "server.log").read_text()[-2000:]
                raise RuntimeError(f"mlflow server exited: {tail}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        stop_process(self.process)
        raise RuntimeError(f"mlflow server did not become healthy in {timeout:g} s")


def launch_mlflow_server(root: Path, port: int | None = None) -> MlflowServer:
    """`mlflow server` with a sqlite store and served artifacts under `root`, started and not
    waited for (wait_healthy). Its output is appended to root/server.log (across restarts)."""
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(root / "server.log", "ab") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server",
             "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
             "--serve-artifacts", "--artifacts-destination", str(root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return MlflowServer(f"http://127.0.0.1:{port}", root, proc)


def start_mlflow_server(root: Path, port: int | None = None,
                        timeout: float = HEALTH_TIMEOUT) -> MlflowServer:
    """`mlflow server` with a sqlite store and served artifacts under `root`, once /health
    answers. Its output is appended to root/server.log (across restarts)."""
    return launch_mlflow_server(root, port).wait_healthy(timeout)
