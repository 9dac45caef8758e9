"""Who used the CPU during a phase: the worker, our PostgreSQL, the bench itself, and everything
else on the machine (other people's work on a shared box), in cores."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, int, int]:
    """(ppid, utime+stime, cutime+cstime) in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def _busy_total() -> tuple[int, int]:
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


class CpuMeter:
    def __init__(self, datadir: Path | None) -> None:
        self.datadir = datadir
        self.worker_pid: int | None = None

    def _postmaster(self) -> int | None:
        if self.datadir is None:
            return None
        with contextlib.suppress(OSError, ValueError):
            return int((self.datadir / "postmaster.pid").read_text().split()[0])
        return None

    def snapshot(self) -> dict[str, float]:
        busy, total = _busy_total()
        ours: dict[str, int] = {"bench": 0, "worker": 0, "postgres": 0}
        with contextlib.suppress(OSError):
            _, own, kids = _stat(os.getpid())
            ours["bench"] = own  # its children (producers are in-process) not counted
        if self.worker_pid:
            with contextlib.suppress(OSError):
                _, own, kids = _stat(self.worker_pid)
                ours["worker"] = own + kids
        pm = self._postmaster()
        if pm:
            with contextlib.suppress(OSError):
                _, own, kids = _stat(pm)  # exited backends are reaped into cutime/cstime
                ours["postgres"] = own + kids
            for entry in os.scandir("/proc"):
                if entry.name.isdigit():
                    with contextlib.suppress(OSError, ValueError, IndexError):
                        ppid, own, _ = _stat(int(entry.name))
                        if ppid == pm:
                            ours["postgres"] += own
        return {"t": time.monotonic(), "busy": busy, "total": total, **ours}

    @staticmethod
    def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        """Cores used between two snapshots, by whom (machine = all CPUs, busy)."""
        secs = b["t"] - a["t"]
        if secs <= 0:
            return {}
        ncpu = os.cpu_count() or 1
        busy_share = (b["busy"] - a["busy"]) / max(b["total"] - a["total"], 1)
        cores = {k: (b[k] - a[k]) / CLK_TCK / secs for k in ("bench", "worker", "postgres")}
        machine = busy_share * ncpu
        # A process that started and ended between the snapshots (not ours) counts as others.
        others = max(0.0, machine - sum(cores.values()))
        return {"machine_busy_cores": round(machine, 2), **{k: round(v, 2)
                                                            for k, v in cores.items()},
                "others_cores": round(others, 2), "loadavg_1m": round(os.getloadavg()[0], 2)}
