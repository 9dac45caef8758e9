"""The docker CLI, a daemon started when none runs, our image built, containers run and watched.

Everything goes through the real `docker` command against a real daemon. Containers always run
with `--network host` (a daemon this module starts has no bridge at all: `--bridge=none`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import ROOT

# What the container tier prints in its section at the end of the run (see its conftest).
REPORT: dict[str, str] = {}


class Unavailable(Exception):
    """Containers cannot run on this machine (the reason says why)."""


@dataclass
class Docker:
    exe: str

    def __call__(self, *args: str, check: bool = True, timeout: float = 120,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([self.exe, *args], capture_output=True, text=True,
                                timeout=timeout, check=False, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})})
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args[:3])} ... exited {result.returncode}:\n"
                                 f"{result.stderr[-3000:]}{result.stdout[-1000:]}")
        return result

    def server_version(self) -> str | None:
        result = self("version", "--format", "{{.Server.Version}}", check=False, timeout=20)
        return result.stdout.strip() if result.returncode == 0 else None

    def inspect(self, ref: str) -> dict[str, Any]:
        data = json.loads(self("inspect", ref).stdout)
        assert isinstance(data, list) and len(data) == 1
        return dict(data[0])


# -- the daemon ---------------------------------------------------------------------------------


@dataclass
class Daemon:
    docker: Docker
    version: str
    proc: subprocess.Popen[bytes] | None = None  # set when this run started it
    log: Path | None = None

    def stop(self) -> None:
        """Stop the daemon this run started (and only that one); its images stay cached."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _apt_install(*packages: str) -> str | None:
    """apt-get install, as root; the reason it could not, or None."""
    if os.geteuid() != 0:
        return "not root, so cannot apt-get install"
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for args in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]):
        result = subprocess.run(args, capture_output=True, text=True, env=env, check=False,
                                timeout=600)
        if result.returncode != 0:
            return f"`{' '.join(args)}` exited {result.returncode}: {result.stderr[-800:]}"
    return None


def ensure_tools() -> None:
    """dockerd, the docker CLI and debootstrap, installed from Debian's packages if missing."""
    missing = [pkg for tool, pkg in (("dockerd", "docker.io"), ("docker", "docker.io"),
                                     ("debootstrap", "debootstrap")) if not shutil.which(tool)]
    if missing and (reason := _apt_install(*sorted(set(missing)))):
        raise Unavailable(f"{', '.join(sorted(set(missing)))} missing and not installable: "
                          f"{reason}")


def start_daemon(log: Path) -> Daemon:
    """The running daemon, or one started now (by hand: no systemd), host network only."""
    exe = shutil.which("docker")
    if exe is None:
        raise Unavailable("no docker CLI")
    docker = Docker(exe)
    if version := docker.server_version():
        return Daemon(docker, version)
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise Unavailable("no dockerd")
    if os.geteuid() != 0:
        raise Unavailable("no docker daemon answers, and starting one needs root")
    with open(log, "ab") as out:
        proc = subprocess.Popen([dockerd, "--bridge=none", "--iptables=false"], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if version := docker.server_version():
            if proc.poll() is not None:  # another run's daemon won the race: use that one
                return Daemon(docker, version)
            return Daemon(docker, version, proc, log)
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
    tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
    raise Unavailable(f"dockerd did not start within 60 s (exit {proc.returncode}):\n{tail}")


# -- our image ----------------------------------------------------------------------------------


@dataclass
class Image:
    id: str
    tag: str
    base: str
    size_bytes: int
    build_seconds: float


def build_image(docker: Docker, base: str, tag: str, log: Path) -> Image:
    """`docker build` of the repository's Dockerfile with the classic builder, host network."""
    started = time.monotonic()
    iidfile = log.with_suffix(".iid")
    with open(log, "ab") as out:
        result = subprocess.run(
            [docker.exe, "build", "--network", "host", "--build-arg", f"PYTHON_IMAGE={base}",
             "--iidfile", str(iidfile), "-t", tag, "-f", str(ROOT / "Dockerfile"), str(ROOT)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False,
            timeout=900, env={**os.environ, "DOCKER_BUILDKIT": "0"})
    if result.returncode != 0:
        raise AssertionError(f"docker build exited {result.returncode}:\n"
                             f"{log.read_text(errors='replace')[-4000:]}")
    image_id = iidfile.read_text().strip()
    size = int(docker("image", "inspect", "--format", "{{.Size}}", image_id).stdout)
    return Image(image_id, tag, base, size, time.monotonic() - started)


# -- containers ---------------------------------------------------------------------------------


@dataclass
class Container:
    docker: Docker
    name: str
    started: list[float] = field(default_factory=list)  # time.monotonic() of each start

    def state(self) -> dict[str, Any]:
        return dict(self.docker.inspect(self.name)["State"])

    def running(self) -> bool:
        return bool(self.state()["Running"])

    def health(self) -> str | None:
        health = self.state().get("Health")
        return str(health["Status"]) if health else None

    def pid(self) -> int:
        return int(self.state()["Pid"])

    def logs(self) -> str:
        result = self.docker("logs", self.name, check=False)
        return result.stdout + result.stderr

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.logs().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    out.append(event)
        return out

    def wait_exit(self, timeout: float) -> int:
        result = self.docker("wait", self.name, timeout=timeout)
        return int(result.stdout.strip())

    def start(self) -> None:
        self.started.append(time.monotonic())
        self.docker("start", self.name)

    def remove(self) -> None:
        self.docker("rm", "-f", "-v", self.name, check=False)


def run_container(docker: Docker, name: str, image: str, command: list[str], *,
                  env: dict[str, str], restart: str = "no", healthcheck: bool = True,
                  mounts: dict[Path, str] | None = None,
                  health_interval: str | None = None) -> Container:
    """`docker run -d --network host` with the given environment and read-only file mounts."""
    args = ["run", "-d", "--name", name, "--network", "host", "--restart", restart]
    if not healthcheck:
        args.append("--no-healthcheck")
    elif health_interval:
        args += ["--health-interval", health_interval]
    for source, target in (mounts or {}).items():
        args += ["-v", f"{source}:{target}:ro"]
    for key, value in env.items():
        args += ["-e", f"{key}={value}"]
    container = Container(docker, name)
    container.started.append(time.monotonic())
    docker(*args, image, *command, timeout=60)
    return container


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.2,
               detail: Any = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = detail() if callable(detail) else ""
            raise AssertionError(f"not {what} after {timeout} s\n{extra}")
        time.sleep(interval)
