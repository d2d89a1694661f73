"""The node daemon against supervisord: bring-up, restart latency, idle cost.

What: for each scale (100 and 1,000 agents; 10 with ``--quick``), the same three
measurements on a ``reconciler daemon`` and on a supervisord with one program per
agent, one after the other in this run, every agent ``/bin/sleep 3600``:

- bring-up: from the start request (the daemon's SyncAgentStates call; supervisord's
  ``startAllProcesses(wait=False)`` XML-RPC call, its fastest way) until every agent
  process exists and has exec'd, seen by scanning /proc in this process; each side
  (and the floor) brings its agents up ``Scale.start_runs`` times from scratch, and
  the figure is the median (one bring-up of ~0.1 s moves by tens of percent on a
  shared machine);
- restart latency: SIGKILL an agent until its new process exists (same scan), one
  kill at a time after a short random pause, so no restart overlaps another (an
  overlapping kill's pipe event would wake supervisord's loop early and flatter it);
  each agent is killed once (a second kill would meet the daemon's crash-loop
  backoff, on purpose);
- idle cost: the server's CPU (utime + stime from /proc/<pid>/stat over a window) and
  RSS with every agent running, after a short settle.

What not: no heartbeats (``bench.heartbeats``); the daemon runs with default settings
(resource monitor every 5 s included).
"""

from __future__ import annotations

import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.daemon_run import MARKER as DAEMON_MARKER
from bench.daemon_run import Daemon, sleep_spec
from bench.procs import ChildWatcher, CpuWindow, rss_bytes
from bench.report import Figure, Section, at_most_plus, at_most_ratio, below
from bench.spawn_floor import MARKER as FLOOR_MARKER
from bench.supervisord import MARKER as SUPERVISOR_MARKER
from bench.supervisord import Supervisord, supervisord_version

__all__ = ["Measured", "Scale", "run"]

_ROOT = Path(__file__).resolve().parent.parent
POLL_S = 0.0005
"""Pause between /proc scans while waiting for processes (a scan itself costs ~0.1-0.5 ms)."""
SETTLE_S = 3.0
PAUSE_S = (0.02, 0.07)
"""A random pause before each kill, after the previous agent is back."""
COMMAND = ("/bin/sleep", "3600")
_MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Scale:
    agents: int
    kills: int
    idle_s: float
    start_runs: int
    """Bring-ups from scratch per side; the start figures are their medians."""


@dataclass(frozen=True, slots=True)
class Measured:
    ups_s: Sequence[float]
    api_readies_s: Sequence[float]
    restarts_s: Sequence[float]
    idle_cpu_percent: float
    idle_rss_bytes: int

    @property
    def up_s(self) -> float:
        return statistics.median(self.ups_s)

    @property
    def api_ready_s(self) -> float:
        return statistics.median(self.api_readies_s)

    @property
    def restart_median_s(self) -> float:
        return statistics.median(self.restarts_s)

    @property
    def restart_p99_s(self) -> float:
        ordered = sorted(self.restarts_s)
        return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def _names(count: int) -> list[str]:
    return [f"agent-{i:04d}" for i in range(count)]


def _wait_for_children(watcher: ChildWatcher, count: int, *, timeout_s: float) -> float:
    deadline = time.perf_counter() + timeout_s
    while len(watcher.children) < count:
        watcher.scan()
        if time.perf_counter() > deadline:
            raise RuntimeError(f"only {len(watcher.children)} of {count} agents after {timeout_s}s")
        time.sleep(POLL_S)
    return time.perf_counter()


def _wait_until(condition: Callable[[], bool], *, timeout_s: float, interval_s: float) -> float:
    deadline = time.perf_counter() + timeout_s
    while not condition():
        if time.perf_counter() > deadline:
            raise RuntimeError(f"condition not met within {timeout_s}s")
        time.sleep(interval_s)
    return time.perf_counter()


def _restarts(watcher: ChildWatcher, scale: Scale) -> list[float]:
    """SIGKILL ``scale.kills`` distinct agents one at a time; seconds until each is back."""
    rng = random.Random(scale.agents)
    latencies: list[float] = []
    for name, pid in sorted(watcher.by_value().items())[: scale.kills]:
        time.sleep(rng.uniform(*PAUSE_S))
        killed_at = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        watcher.forget(pid)
        while True:
            found = watcher.scan()
            now = time.perf_counter()
            if any(value == name for _pid, value in found):
                latencies.append(now - killed_at)
                break
            if now - killed_at > 60:
                raise RuntimeError(f"{name} not restarted within 60 s")
            time.sleep(POLL_S)
    return latencies


def _idle(pid: int, idle_s: float) -> tuple[float, int]:
    time.sleep(SETTLE_S)
    window = CpuWindow.start(pid)
    time.sleep(idle_s)
    return window.percent_of_core(), rss_bytes(pid)


def _measure_daemon(root: Path, scale: Scale) -> Measured:
    ups: list[float] = []
    readies: list[float] = []
    restarts: list[float] = []
    cpu, rss = 0.0, 0
    for run in range(scale.start_runs):
        daemon = Daemon(root / f"run-{run}")
        try:
            daemon.start()
            watcher = ChildWatcher(daemon.pid, DAEMON_MARKER)
            specs = [sleep_spec(name, COMMAND) for name in _names(scale.agents)]
            requested = time.perf_counter()
            daemon.sync(specs)
            ups.append(_wait_for_children(watcher, scale.agents, timeout_s=300) - requested)
            ready = _wait_until(daemon.all_running, timeout_s=120, interval_s=0.05)
            readies.append(ready - requested)
            if run < scale.start_runs - 1:
                continue
            restarts = _restarts(watcher, scale)
            _wait_until(daemon.all_running, timeout_s=120, interval_s=0.2)
            cpu, rss = _idle(daemon.pid, scale.idle_s)
        finally:
            daemon.close()
    return Measured(ups, readies, restarts, cpu, rss)


def _measure_supervisord(root: Path, scale: Scale) -> Measured:
    ups: list[float] = []
    readies: list[float] = []
    restarts: list[float] = []
    cpu, rss = 0.0, 0
    for run in range(scale.start_runs):
        programs = [(name, COMMAND) for name in _names(scale.agents)]
        supervisord = Supervisord(root / f"run-{run}", programs)
        try:
            supervisord.start()
            watcher = ChildWatcher(supervisord.pid, SUPERVISOR_MARKER)
            requested = time.perf_counter()
            supervisord.start_all()
            ups.append(_wait_for_children(watcher, scale.agents, timeout_s=300) - requested)

            def all_running(supervisord: Supervisord = supervisord) -> bool:
                return all(state == "RUNNING" for state in supervisord.states().values())

            readies.append(_wait_until(all_running, timeout_s=120, interval_s=0.05) - requested)
            if run < scale.start_runs - 1:
                continue
            restarts = _restarts(watcher, scale)
            _wait_until(all_running, timeout_s=120, interval_s=0.2)
            cpu, rss = _idle(supervisord.pid, scale.idle_s)
        finally:
            supervisord.close()
    return Measured(ups, readies, restarts, cpu, rss)


def _measure_floor(root: Path, scale: Scale) -> list[float]:
    """Seconds for ``bench.spawn_floor`` to bring ``scale.agents`` agents up, per run."""
    return [_floor_once(root / f"run-{run}", scale) for run in range(scale.start_runs)]


def _floor_once(root: Path, scale: Scale) -> float:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.spawn_floor", "--count", str(scale.agents),
         "--dir", str(root), *COMMAND],
        cwd=_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("bench.spawn_floor did not start")
        watcher = ChildWatcher(proc.pid, FLOOR_MARKER)
        requested = time.perf_counter()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        return _wait_for_children(watcher, scale.agents, timeout_s=300) - requested
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def _figures(scale: Scale, ours: Measured, theirs: Measured, floor_s: float) -> list[Figure]:
    n = scale.agents
    quarter = at_most_ratio(0.25, "≤ 1/4 of supervisord")
    twentieth = at_most_ratio(0.05, "≤ 1/20 of supervisord")
    idle_cpu = at_most_plus(0.5, "≤ supervisord + 0.5 points")
    ms = 1000.0
    return [
        Figure(f"{n} agents: start → all processes exist", "s", ours.up_s, theirs.up_s, quarter),
        Figure(f"{n} agents: the same start, bare Popen loop (the floor)", "s",
               floor_s, theirs.up_s),
        Figure(f"{n} agents: start → API shows all running", "s",
               ours.api_ready_s, theirs.api_ready_s),
        Figure(f"{n} agents: restart after SIGKILL, median", "ms",
               ms * ours.restart_median_s, ms * theirs.restart_median_s, twentieth),
        Figure(f"{n} agents: restart after SIGKILL, p99", "ms",
               ms * ours.restart_p99_s, ms * theirs.restart_p99_s, twentieth),
        Figure(f"{n} agents: idle CPU", "% of a core",
               ours.idle_cpu_percent, theirs.idle_cpu_percent, idle_cpu),
        Figure(f"{n} agents: idle RSS", "MiB",
               ours.idle_rss_bytes / _MIB, theirs.idle_rss_bytes / _MIB, below(80, "< 80 MiB")),
    ]  # fmt: skip


def _seconds(samples: Sequence[float]) -> str:
    return ", ".join(f"{value:.3f}" for value in samples) + " s"


def scales(quick: bool) -> list[Scale]:
    if quick:
        return [Scale(agents=10, kills=10, idle_s=1.0, start_runs=2)]
    return [
        Scale(agents=100, kills=100, idle_s=15.0, start_runs=5),
        Scale(agents=1000, kills=100, idle_s=15.0, start_runs=5),
    ]


def run(*, quick: bool = False) -> Section:
    """Measure every scale, the daemon then supervisord at each."""
    figures: list[Figure] = []
    details: dict[str, str] = {}
    for scale in scales(quick):
        with tempfile.TemporaryDirectory(prefix="bench-agents-") as tmp:
            ours = _measure_daemon(Path(tmp) / "daemon", scale)
            theirs = _measure_supervisord(Path(tmp) / "supervisord", scale)
            floors_s = _measure_floor(Path(tmp) / "floor", scale)
        figures += _figures(scale, ours, theirs, statistics.median(floors_s))
        details[f"{scale.agents} agents, start → all processes exist, each run"] = (
            f"daemon {_seconds(ours.ups_s)}; supervisord {_seconds(theirs.ups_s)}; "
            f"floor {_seconds(floors_s)} (the figures are the medians)"
        )
        details[f"{scale.agents} agents, kills"] = (
            f"{len(ours.restarts_s)} (daemon) / {len(theirs.restarts_s)} (supervisord), "
            f"one at a time, each agent once; idle window {scale.idle_s:.0f} s "
            f"after {SETTLE_S:.0f} s settle"
        )
    return Section(
        key="agents",
        title="Node daemon vs supervisord",
        issue="issue 3 (node daemon)",
        comparison=f"supervisord {supervisord_version()}",
        method=(
            "Every agent is `/bin/sleep 3600`. The daemon runs with its default settings "
            "(state directory, per-agent log files, resource monitor every 5 s); supervisord "
            "runs with one `[program]` per agent (`startsecs=0`, `autorestart=true`, output "
            "to log files, each program in its own process group) on its own Unix socket. "
            "*Start*: from the start request (the daemon: SyncAgentStates of all agents, "
            "over a gRPC channel connected beforehand as the Manager's is; supervisord: "
            "`startAllProcesses(wait=False)` over XML-RPC on its Unix socket) until every agent "
            "process exists and has exec'd, found by scanning /proc every 0.5 ms from the "
            "benchmark process; *API shows all running*: the same start until ListAgents "
            "(resp. `getAllProcessInfo`) first shows every agent running, polled every "
            "50 ms. Each side, and the floor, brings its agents up several times (five; "
            "twice with `--quick`), each time in a fresh process and directory, and the "
            "start figures are the medians (each run is listed below); restarts and the "
            "idle cost are measured in the last run. *Restart*: SIGKILL of an agent until "
            "its new process has exec'd (same scan, so about 1 ms resolution), one distinct "
            "agent at a time, the next 20-70 ms "
            "after the previous one is back, so restarts never overlap (supervisord spawns "
            "on the loop pass after the one that reaps, and another process's event would "
            "start that pass early). *Idle*: CPU from "
            "utime+stime of the server process over the window, and its VmRSS. *The "
            "floor*: `bench/spawn_floor.py`, a Python process that only spawns the agents "
            "the way the daemon's supervisor does (Popen of the argv in its own session, "
            "output appended to a new log file per agent), timed by the same scan: what "
            "fork, exec and the log files cost on this machine before any supervision."
        ),
        figures=figures,
        details=details,
    )
