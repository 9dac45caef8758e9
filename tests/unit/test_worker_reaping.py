"""Worker subprocesses are reaped as they end: a test's teardown waits until a worker has
stopped its work, not for its interpreter's exit, and that exit must not leave a <defunct>
process behind for the rest of the run (dozens piled up before). Real processes, no worker:
a child that logs worker_stopped on SIGTERM and then takes a moment to exit, as a worker does."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sensor_predictor.devtools.worker_process import WorkerProcess, reap_when_exits
from tests.support.fixtures import stop_workers

# Logs worker_stopped when told to stop, then exits 0.3 s later (an interpreter's exit).
STOPPING_CHILD = """
import signal, sys, time
def stop(*_):
    print('{"event": "worker_stopped"}', flush=True)
    time.sleep(0.3)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print('{"event": "worker_started"}', flush=True)
while True:
    time.sleep(0.05)
"""


def _stat(pid: int | str) -> list[str] | None:
    """/proc/<pid>/stat after the command name: state, ppid, ...; None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _state(pid: int) -> str | None:
    """The process's state letter (Z: a zombie nobody reaped); None once it is gone."""
    stat = _stat(pid)
    return stat[0] if stat else None


def _zombie_children() -> list[str]:
    return [p for p in os.listdir("/proc") if p.isdigit()
            for stat in [_stat(p)] if stat and stat[0] == "Z" and stat[1] == str(os.getpid())]


def _until(predicate: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_a_child_nobody_waits_for_stays_a_zombie_and_a_reaper_removes_it() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        assert _until(lambda: _state(proc.pid) == "Z"), "the check cannot see a zombie"
        reap_when_exits(proc).join(10)
        assert _state(proc.pid) is None
        assert proc.returncode == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()


def _worker_like(tmp_path: Path) -> WorkerProcess:
    w = WorkerProcess({}, tmp_path / "worker.log")
    w._log_start = 0
    w._log = open(w.log_path, "ab")  # noqa: SIM115 - closed by the reaper
    w.proc = subprocess.Popen([sys.executable, "-c", STOPPING_CHILD], stdout=w._log,
                              stderr=subprocess.STDOUT)
    assert _until(lambda: b"worker_started" in w.log_path.read_bytes())
    return w


def test_a_stopped_worker_is_reaped_as_its_interpreter_exits(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / str(i)).mkdir()
    workers = [_worker_like(tmp_path / str(i)) for i in range(3)]
    started = time.monotonic()
    stop_workers(workers)
    assert time.monotonic() - started < 0.3 * len(workers), \
        "the teardown waited for the interpreters' exit"
    for w in workers:
        assert w.proc is not None
        pid = w.proc.pid
        assert _until(lambda pid=pid: _state(pid) is None, 10), \
            f"worker {pid} is {_state(pid)} after it exited: nobody reaped it"
        assert w.proc.returncode == 0
    assert not _zombie_children()
