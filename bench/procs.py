"""Process measurements from /proc: CPU time, RSS, and the exec'd children of a parent.

What: ``cpu_seconds`` and ``rss_bytes`` read one process's counters; ``CpuWindow``
turns two readings into percent of one core; ``ChildWatcher`` finds the children of
one parent process (the daemon, or supervisord) that have exec'd into an agent, named
by a marker variable in their environment (``RECONCILER_AGENT_ID`` or
``SUPERVISOR_PROCESS_NAME``). A child counts once its environment carries the marker,
that is once ``execve`` has run: a forked child that has not exec'd yet still has its
parent's environment and is looked at again on the next scan.

What not: no signals, no waiting policy (the callers poll ``scan`` at their own pace).
Pids are kept only while ``/proc`` lists them, so a reused pid (pid_max may be small
in a container) is seen as new.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import time
from dataclasses import dataclass

__all__ = [
    "ChildWatcher",
    "CpuWindow",
    "cpu_seconds",
    "kill_marked",
    "marked_processes",
    "raise_nofile_limit",
    "rss_bytes",
]

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rpartition(b")")[2].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (VmRSS)."""
    with open(f"/proc/{pid}/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass(frozen=True, slots=True)
class CpuWindow:
    """CPU used by one process between two instants."""

    pid: int
    cpu_s: float
    wall_s: float

    @classmethod
    def start(cls, pid: int) -> CpuWindow:
        return cls(pid, cpu_seconds(pid), time.monotonic())

    def percent_of_core(self) -> float:
        """Percent of one core used since ``start``."""
        used = cpu_seconds(self.pid) - self.cpu_s
        return 100.0 * used / max(time.monotonic() - self.wall_s, 1e-9)


def _parent_of(name: str) -> str | None:
    try:
        with open(f"/proc/{name}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[1].decode()
    except (OSError, IndexError):
        return None


def _marker_value(name: str, marker: bytes) -> str | None:
    try:
        with open(f"/proc/{name}/environ", "rb") as env:
            data = env.read()
    except OSError:
        return None
    for item in data.split(b"\0"):
        if item.startswith(marker):
            return item[len(marker) :].decode(errors="replace")
    return None


class ChildWatcher:
    """The exec'd children of one parent, by the value of a marker variable."""

    def __init__(self, parent_pid: int, marker: str) -> None:
        self._parent = str(parent_pid)
        self._marker = f"{marker}=".encode()
        self._others: set[str] = set()
        self.children: dict[int, str] = {}
        """pid -> marker value, for every live exec'd child seen so far."""

    def scan(self) -> list[tuple[int, str]]:
        """Look at /proc once; return the children that appeared since the last scan."""
        listed = {name for name in os.listdir("/proc") if name.isdigit()}
        self._others &= listed
        known = {str(pid) for pid in self.children}
        for gone in known - listed:
            del self.children[int(gone)]
        found = []
        for name in listed - known - self._others:
            if _parent_of(name) != self._parent:
                self._others.add(name)
                continue
            value = _marker_value(name, self._marker)
            if value is not None:
                self.children[int(name)] = value
                found.append((int(name), value))
        return found

    def forget(self, pid: int) -> None:
        """Stop counting ``pid`` (it was killed; its zombie may linger a moment)."""
        self.children.pop(pid, None)
        self._others.add(str(pid))

    def by_value(self) -> dict[str, int]:
        """marker value -> pid."""
        return {value: pid for pid, value in self.children.items()}


def marked_processes(marker: str) -> list[int]:
    """Every live process whose environment holds ``marker`` (``NAME=value``)."""
    wanted = marker.encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{name}/environ", "rb") as env:
            if wanted in env.read().split(b"\0"):
                found.append(int(name))
    return found


def kill_marked(marker: str) -> int:
    """SIGKILL the process group of every process carrying ``marker``; how many there were."""
    pids = [pid for pid in marked_processes(marker) if pid != os.getpid()]
    for pid in pids:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def raise_nofile_limit() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard one; the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft
