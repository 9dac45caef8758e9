"""`sensor-predictor demo`, end to end, as a user runs it: a subprocess with its own PostgreSQL.

The runs need PostgreSQL binaries (initdb, pg_ctl) for the throwaway cluster; the embedded run
needs the `embedded` extra (pgserver); the env run uses the suite's PostgreSQL (tests/conftest).
Nothing is skipped for lack of the binaries: the default path must work where CI runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sensor_predictor.devtools.postgres import PgServer, free_port

STATUS_ROW = re.compile(r"^\s+\d+\.\ds\s+\d+\s+\d+\s", re.MULTILINE)

# --duration of a whole run: the drift at 0.5 D is on record within a second (a window of 100
# readings at 200/s), the retrained model is activated at 0.7 D and must be served before D to
# predict anything. With the four runs side by side on 2 cores a run's timeline slips by a
# second or two (6 s failed once: v2 served at 6.1 s, nothing left for it to score), so 10 s.
# A run's set-up (PostgreSQL, the first model's training, MLflow's import) costs 7-10 s more.
FULL_RUN_SECONDS = 10


def demo_env(**extra: str) -> dict[str, str]:
    """The test's environment without anything that names a PostgreSQL or forces a mode."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("POSTGRES_") and k != "DEMO_POSTGRES"}
    env.update({"METRICS_PORT": str(free_port()), "PYTHONUNBUFFERED": "1", **extra})
    return env


def new_workdir() -> Path:
    """Under the temp dir, not pytest's tmp_path: as root the demo runs PostgreSQL as the
    `postgres` account, which must reach the work folder (pytest's base folder is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="sp-demo-"))
    path.chmod(0o755)
    return path


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = new_workdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def demo_cmd(workdir: Path, duration: float = FULL_RUN_SECONDS, rate: float = 200) -> list[str]:
    return [sys.executable, "-m", "sensor_predictor.cli", "demo", "--duration", str(duration),
            "--rate", str(rate), "--workdir", str(workdir)]


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True,
                         text=True, check=True).stdout
    table: dict[int, tuple[int, str]] = {}
    for line in out.splitlines():
        pid, ppid, *args = line.split(None, 2)
        table[int(pid)] = (int(ppid), args[0] if args else "")
    return table


def started_from(workdir: Path) -> set[int]:
    """Processes whose command line names the work folder, and all their descendants."""
    table = processes()
    found = {pid for pid, (_, args) in table.items()
             if str(workdir) in args and pid != os.getpid()}
    grew = True
    while grew:
        children = {pid for pid, (ppid, _) in table.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def summary_value(output: str, label: str) -> str:
    match = re.search(rf"^  {re.escape(label)}\s+(.*)$", output, re.MULTILINE)
    assert match, f"no {label!r} line in the summary:\n{output}"
    return match.group(1).strip()


def check_full_run(output: str) -> None:
    """What a run that went to its end must show."""
    assert re.match(r"OK: each of the [1-9]\d* readings has exactly one prediction or error",
                    summary_value(output, "exactly-once")), output
    # The first model, the hourly retrain, the candidate promoted.
    served = summary_value(output, "models served").split(" -> ")
    assert len(served) == 3 and len(set(served)) == 3, output
    per_version = dict(re.findall(r"v(\d+): (\d+)", summary_value(output, "predictions")))
    assert len(per_version) == 3 and all(int(n) > 0 for n in per_version.values()), output
    assert int(summary_value(output, "drift events")) >= 1, output
    assert "drift detected on model" in output
    assert "mid-stream" in output and "the worker now serves model" in output
    # The hourly retrain (same stream) speaks in the first model's ids: continuous. It fits on
    # the few hundred readings streamed so far (more on a busy machine, where it comes later),
    # so a cluster may land beyond the matching rule (cluster_ids.py) and get a fresh id, never
    # one of the first model's: most of the first model's ids carry on, none is reused.
    first, hourly = ([int(i) for i in re.findall(r"(\d+): \d+%", line)] for line in re.findall(
        r"^ {2}(?:by cluster id| {13}) {6}v\d+ {2}(.*)$", output, re.MULTILINE)[:2])
    assert first and len(hourly) == len(first), output
    carried = set(first) & set(hourly)
    assert 2 * len(carried) >= len(first), output
    assert all(i > max(first) for i in set(hourly) - carried), output
    # The candidate: scored in the shadow, its agreement measured, then promoted.
    shadow = summary_value(output, "shadow")
    assert re.search(rf"candidate {served[2]}: [1-9]\d* readings scored beside the active "
                     r"model, [1-9]\d* window\(s\): adjusted Rand index -?\d\.\d{3}", shadow), \
        output
    assert f"promoting candidate {served[2]}" in output
    assert STATUS_ROW.search(output), output


# --------------------------------------------------------------------------- fast checks


def test_unknown_postgres_mode_is_a_usage_error(workdir: Path) -> None:
    done = subprocess.run(demo_cmd(workdir, 5), env=demo_env(DEMO_POSTGRES="mysql"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "DEMO_POSTGRES='mysql'" in done.stderr


def test_env_mode_without_postgres_variables_fails_fast(workdir: Path) -> None:
    done = subprocess.run(demo_cmd(workdir, 5), env=demo_env(DEMO_POSTGRES="env"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "no POSTGRES_* variable is set" in done.stdout
    assert not started_from(workdir)


# --------------------------------------------------------------------------- whole runs
#
# The four whole runs are independent processes (each its own work folder, PostgreSQL or scratch
# database, MLflow store and metrics port), and most of a run is waiting for its stream: they
# start together when the first of their tests begins, and each test then checks its own run
# (the SIGINT run streams until its test interrupts it). About 30 s for the four, not 55.


@dataclass
class Running:
    """A demo subprocess whose stdout is read line by line as it comes."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for_line(self, pattern: re.Pattern[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if pattern.search(line):
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern.pattern!r}:\n{self.output()}")

    def output(self) -> str:
        if self.proc.poll() is not None:
            self._reader.join(timeout=10)
        return "\n".join(self.lines)

    def close(self) -> None:
        """Stop the process if it still runs, read to the end, close the pipe."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(timeout=10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@dataclass
class DemoRun:
    """One whole run in the background: its folders, its process, its stderr in a file."""

    workdir: Path
    cwd: Path
    demo: Running
    stderr_path: Path

    def finish(self, timeout: float = 280) -> tuple[int, str, str]:
        """Wait for the end of the run: exit code, stdout, stderr."""
        try:
            code = self.demo.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.demo.proc.kill()
            raise
        return code, self.demo.output(), self.stderr_path.read_text()


# test name -> (the run's --duration, environment beyond demo_env; "env" runs get POSTGRES_*)
WHOLE_RUNS: dict[str, tuple[float, dict[str, str]]] = {
    "test_demo_on_a_throwaway_cluster": (FULL_RUN_SECONDS, {}),
    "test_sigint_stops_everything_and_summarises": (600, {}),
    "test_demo_on_the_embedded_server": (FULL_RUN_SECONDS, {"DEMO_POSTGRES": "embedded"}),
    "test_demo_on_the_server_named_by_the_environment": (FULL_RUN_SECONDS,
                                                         {"DEMO_POSTGRES": "env"}),
}


def _selected(item: pytest.Item) -> bool:
    if item.name == "test_demo_on_the_embedded_server":
        return importlib.util.find_spec("pgserver") is not None
    return item.name in WHOLE_RUNS


class DemoRuns:
    """The whole runs of this module's selected tests, started together on first use."""

    def __init__(self, pg_server: PgServer, tmp: Path) -> None:
        self.pg_server, self.tmp = pg_server, tmp
        self.runs: dict[str, DemoRun] = {}

    def start(self, name: str) -> DemoRun:
        duration, extra = WHOLE_RUNS[name]
        workdir = new_workdir()
        cwd = self.tmp / name / "cwd"  # empty: nothing (./mlruns ...) may land there
        cwd.mkdir(parents=True)
        if name == "test_demo_on_a_throwaway_cluster":
            (workdir / "mlflow.db").write_bytes(b"a previous run's store")
        if extra.get("DEMO_POSTGRES") == "env":
            extra = {**extra, **self.pg_server.env("postgres")}
        stderr_path = self.tmp / name / "stderr"
        with open(stderr_path, "w") as stderr:  # the child keeps its own descriptor
            proc = subprocess.Popen(demo_cmd(workdir, duration), env=demo_env(**extra),
                                    cwd=cwd, stdout=subprocess.PIPE, stderr=stderr, text=True)
        run = DemoRun(workdir, cwd, Running(proc), stderr_path)
        self.runs[name] = run
        return run

    def get(self, request: pytest.FixtureRequest) -> DemoRun:
        """The run of the requesting test; the first call starts every selected test's run."""
        if not self.runs:
            for item in request.session.items:
                if item.module is request.module and _selected(item) \
                        and item.name not in self.runs:
                    self.start(item.name)
        return self.runs.get(request.node.name) or self.start(request.node.name)

    def stop(self) -> None:
        for run in self.runs.values():
            run.demo.close()
            shutil.rmtree(run.workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def demo_runs(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[DemoRuns]:
    runs = DemoRuns(pg_server, tmp_path_factory.mktemp("demo-runs"))
    yield runs
    runs.stop()


@pytest.fixture
def demo_run(demo_runs: DemoRuns, request: pytest.FixtureRequest) -> DemoRun:
    return demo_runs.get(request)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigint_stops_everything_and_summarises(demo_run: DemoRun) -> None:
    """First of the whole runs: interrupted as soon as it streams, so that it stops taking
    the CPU the three others need to reach their end."""
    demo, workdir, proc = demo_run.demo, demo_run.workdir, demo_run.demo.proc
    try:
        demo.wait_for_line(STATUS_ROW, timeout=240)
        ours = started_from(workdir)
        table = processes()
        postmasters = [pid for pid in ours if f"{workdir}/postgres" in table[pid][1]]
        assert postmasters, f"no postgres process runs from {workdir}: {table}"
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = demo.output()
    assert code == 130, out
    assert took < 30, f"took {took:.1f} s to stop:\n{out}"
    assert "SIGINT: stopping" in out
    assert "summary (interrupted)" in out
    assert summary_value(out, "exactly-once").startswith("OK"), out
    assert "stopped and deleted the throwaway PostgreSQL" in out
    assert [pid for pid in ours if alive(pid)] == []
    assert not started_from(workdir)
    assert not (workdir / "postgres").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_on_a_throwaway_cluster(demo_run: DemoRun) -> None:
    """POSTGRES_* unset: its own cluster from the binaries; drift, a swap, exactly once. A
    previous run's MLflow store in the work folder is replaced: the first model is v1."""
    code, out, err = demo_run.finish()
    workdir, cwd = demo_run.workdir, demo_run.cwd
    assert code == 0, f"{out}\n{err}"
    assert "PostgreSQL: throwaway cluster" in out
    assert "(the previous run's store was replaced)" in out
    assert re.search(r"^model v1 trained on", out, re.MULTILINE), out
    check_full_run(out)
    assert "stopped and deleted the throwaway PostgreSQL" in out
    # Logs go to the work folder, not over the progress; nothing is left behind or running.
    assert err == ""
    assert (workdir / "demo.log").stat().st_size > 0
    assert (workdir / "mlflow.db").is_file()
    assert any((workdir / "artifacts").rglob("MLmodel"))
    assert not (workdir / "postgres").exists()
    assert list(cwd.iterdir()) == []
    assert not started_from(workdir)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(importlib.util.find_spec("pgserver") is None,
                    reason="the `embedded` extra (pgserver) is not installed")
def test_demo_on_the_embedded_server(demo_run: DemoRun) -> None:
    """DEMO_POSTGRES=embedded: what a machine without PostgreSQL gets (pgserver)."""
    code, out, err = demo_run.finish()
    assert code == 0, f"{out}\n{err}"
    assert "embedded PostgreSQL (pgserver)" in out
    check_full_run(out)
    assert not (demo_run.workdir / "pgserver").exists()
    assert not started_from(demo_run.workdir)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_on_the_server_named_by_the_environment(pg_server: PgServer, demo_run: DemoRun
                                                     ) -> None:
    """POSTGRES_* set and answering: a scratch database there, dropped at the end."""
    code, out, err = demo_run.finish()
    assert code == 0, f"{out}\n{err}"
    match = re.search(r"scratch database '(sensor_demo_[0-9a-f]{8})'", out)
    assert match, out
    check_full_run(out)
    assert f"dropped the scratch database '{match[1]}'" in out

    async def exists() -> bool:
        conn = await pg_server.connect()
        try:
            return bool(await conn.fetchval(
                "SELECT count(*) FROM pg_database WHERE datname = $1", match[1]))
        finally:
            await conn.close()

    assert not asyncio.run(exists())
