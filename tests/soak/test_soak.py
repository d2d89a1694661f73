"""Soak: many agents heartbeating while the desired state churns, and nothing grows.

The real daemon runs ``/bin/sleep`` agents. One sender process heartbeats for all of
them over one Unix connection (with each agent's token, read from its environment),
the test replaces a few agents every few seconds with a new generation, and probes
heartbeat latency over HTTP. Every couple of seconds it samples the daemon: resident
memory, open file descriptors, threads, open heartbeat connections and the work
queue, and looks for zombie children. The first third of the samples is compared with
the last third by ratios, never by absolute times: a leak or a slowdown shows as
growth, whatever the machine.

Profiles: the short one (200 agents, 60 s) runs in ``make test``;
``RECONCILER_SOAK=long`` runs 1,000 agents for 10 minutes and prints its figures.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.support.daemon import DaemonProcess, free_port, spec, wait_for

__all__: list[str] = []


@dataclass(frozen=True)
class Profile:
    agents: int
    duration_s: float
    churn_every_s: float
    churn_fraction: float
    heartbeat_period_s: float = 1.0
    sample_every_s: float = 2.0


PROFILES = {
    "short": Profile(agents=200, duration_s=60.0, churn_every_s=4.0, churn_fraction=0.05),
    "long": Profile(agents=1000, duration_s=600.0, churn_every_s=5.0, churn_fraction=0.02),
}
PROFILE_NAME = os.environ.get("RECONCILER_SOAK", "short")
PROFILE = PROFILES[PROFILE_NAME]
SENDER = Path(__file__).with_name("sender.py")

#: Growth allowed from the first third of the run to the last (ratios of like figures).
MAX_RSS_GROWTH = 1.5
MAX_FD_GROWTH = 1.25
MAX_P99_GROWTH = 3.0
#: Small absolute slack for counts that are a handful at rest (threads, connections).
COUNT_SLACK = 4


@dataclass
class Sample:
    at_s: float
    rss_bytes: int
    fds: int
    threads: int
    zombies: int
    connections: float
    queue: float


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)
    latencies_s: list[tuple[float, float]] = field(default_factory=list)
    generations: int = 1
    accepted_before: float = 0.0
    accepted_after: float = 0.0


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(
        tmp_path / "daemon",
        settings={
            "metrics": {"listen": f"127.0.0.1:{free_port()}"},
            "logging": {"level": "warning"},
        },
    )
    process.start()
    try:
        yield process
    finally:
        process.close()


def metrics(daemon: DaemonProcess) -> dict[str, float]:
    """The daemon's unlabelled or unix-transport samples, by name."""
    address = daemon.settings["metrics"]["listen"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        if "{" in name and 'transport="unix"' not in name:
            continue
        found[name.split("{", 1)[0]] = float(value)
    return found


def sample(daemon: DaemonProcess, started_s: float) -> Sample:
    assert daemon.proc is not None
    process = psutil.Process(daemon.proc.pid)
    zombies = sum(1 for child in process.children() if is_zombie(child))
    gauges = metrics(daemon)
    return Sample(
        at_s=time.monotonic() - started_s,
        rss_bytes=process.memory_info().rss,
        fds=process.num_fds(),
        threads=process.num_threads(),
        zombies=zombies,
        connections=gauges.get("reconciler_heartbeat_connections_open", 0.0),
        queue=gauges.get("reconciler_workqueue_depth", 0.0),
    )


def is_zombie(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # reaped between listing and looking: not a zombie
        return False


def token_of(pid: int) -> str:
    with open(f"/proc/{pid}/environ", "rb") as environ:
        for entry in environ.read().split(b"\0"):
            if entry.startswith(b"RECONCILER_AGENT_TOKEN="):
                return entry.split(b"=", 1)[1].decode()
    raise AssertionError(f"no token in the environment of {pid}")


def http_heartbeat_s(daemon: DaemonProcess, agent_id: str, pid: int, token: str) -> float:
    body = json.dumps(
        {
            "agent_id": agent_id,
            "pid": pid,
            "timestamp": time.time(),
            "version": "soak",
            "status": "healthy",
            "cpu": 0.0,
            "memory": 0,
        }
    ).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{daemon.http_port}/heartbeat",
        data=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 202
    return time.perf_counter() - started


def write_agents(path: Path, agents: dict[str, int]) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(agents))
    partial.replace(path)


def thirds(values: list[float]) -> tuple[list[float], list[float]]:
    third = max(1, len(values) // 3)
    return values[:third], values[-third:]


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else values[0]


#: Latency is judged per window: the p99 of each ninth of the run, and the median of
#: those p99s over the first and the last three windows. One scheduler hiccup on a
#: shared machine moves one window, not the comparison; a steady slowdown moves all.
WINDOWS = 9


def windowed_p99s(latencies: list[float]) -> tuple[float, float]:
    size = max(2, len(latencies) // WINDOWS)
    windows = [p99(latencies[i : i + size]) for i in range(0, size * WINDOWS, size)]
    return statistics.median(windows[:3]), statistics.median(windows[-3:])


class Soak:
    """Drives one run: churn, latency probes and samples until the profile's end."""

    def __init__(self, daemon: DaemonProcess, agents_file: Path) -> None:
        self.daemon = daemon
        self.agents_file = agents_file
        self.ids = [f"soak-{index}" for index in range(PROFILE.agents)]
        self.next_index = PROFILE.agents
        self.generation = 1
        self.rng = random.Random(8)
        self.pids: dict[str, int] = {}
        self.tokens: dict[str, str] = {}

    def bring_up(self) -> None:
        self.daemon.sync(self.generation, [spec(agent_id) for agent_id in self.ids])
        self._wait_running(set(self.ids))

    def _wait_running(self, wanted: set[str]) -> None:
        def all_running() -> bool:
            running = self.daemon.running()
            self.pids = {
                agent_id: running[agent_id] for agent_id in self.ids if agent_id in running
            }
            return wanted <= running.keys()

        wait_for(all_running, timeout_s=120 + PROFILE.agents / 10, interval_s=0.5)
        write_agents(self.agents_file, self.pids)

    def churn(self) -> None:
        count = max(1, int(len(self.ids) * PROFILE.churn_fraction))
        leaving = set(self.rng.sample(self.ids, count))
        self.ids = [agent_id for agent_id in self.ids if agent_id not in leaving]
        write_agents(self.agents_file, {a: p for a, p in self.pids.items() if a not in leaving})
        arriving = [f"soak-{self.next_index + n}" for n in range(count)]
        self.next_index += count
        self.ids.extend(arriving)
        self.generation += 1
        self.daemon.sync(self.generation, [spec(agent_id) for agent_id in self.ids])
        self._wait_running(set(arriving))

    def probe(self, run: Run, started_s: float) -> None:
        agent_id = self.rng.choice(sorted(self.pids))
        pid = self.pids[agent_id]
        token = self.tokens.get(f"{agent_id}:{pid}") or token_of(pid)
        self.tokens[f"{agent_id}:{pid}"] = token
        run.latencies_s.append(
            (time.monotonic() - started_s, http_heartbeat_s(self.daemon, agent_id, pid, token))
        )


@pytest.mark.slow
@pytest.mark.timeout(PROFILE.duration_s + 300 + PROFILE.agents / 5)
def test_many_agents_heartbeating_through_churn_leave_the_daemon_flat(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    soak = Soak(daemon, tmp_path / "agents.json")
    soak.bring_up()
    sender = subprocess.Popen(
        [sys.executable, str(SENDER), str(soak.agents_file), str(daemon.socket_path), "1.0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    run = Run(accepted_before=metrics(daemon).get("reconciler_heartbeats_accepted_total", 0.0))
    try:
        drive(soak, run)
        run.accepted_after = metrics(daemon).get("reconciler_heartbeats_accepted_total", 0.0)
    finally:
        sender.kill()
        output = sender.communicate(timeout=30)[0].decode(errors="replace")
    report(run, soak)
    check(run, daemon, sender_output=output)


def drive(soak: Soak, run: Run) -> None:
    started_s = time.monotonic()
    next_churn_s = next_sample_s = 0.0
    while (now_s := time.monotonic() - started_s) < PROFILE.duration_s:
        if now_s >= next_churn_s:
            soak.churn()
            run.generations += 1
            next_churn_s = now_s + PROFILE.churn_every_s
        if now_s >= next_sample_s:
            run.samples.append(sample(soak.daemon, started_s))
            next_sample_s = now_s + PROFILE.sample_every_s
        soak.probe(run, started_s)
        time.sleep(0.05)


def report(run: Run, soak: Soak) -> None:
    first, last = run.samples[: len(run.samples) // 3], run.samples[-(len(run.samples) // 3) :]
    early, late = thirds([latency for _, latency in run.latencies_s])
    window_early, window_late = windowed_p99s([latency for _, latency in run.latencies_s])
    figures = {
        "profile": PROFILE_NAME,
        "agents": PROFILE.agents,
        "duration_s": PROFILE.duration_s,
        "generations": run.generations,
        "agents_replaced": soak.next_index - PROFILE.agents,
        "heartbeats_accepted": run.accepted_after - run.accepted_before,
        "rss_mib_first_last": [
            round(max(s.rss_bytes for s in first) / 2**20, 1),
            round(max(s.rss_bytes for s in last) / 2**20, 1),
        ],
        "fds_first_last": [max(s.fds for s in first), max(s.fds for s in last)],
        "threads_first_last": [max(s.threads for s in first), max(s.threads for s in last)],
        "max_zombies_seen": max(s.zombies for s in run.samples),
        "p99_ms_first_last": [round(p99(early) * 1000, 2), round(p99(late) * 1000, 2)],
        "windowed_p99_ms_first_last": [
            round(window_early * 1000, 2),
            round(window_late * 1000, 2),
        ],
        "latency_probes": len(run.latencies_s),
    }
    print("soak figures:", json.dumps(figures))


def check(run: Run, daemon: DaemonProcess, *, sender_output: str) -> None:
    assert len(run.samples) >= 9, "too few samples to compare thirds"
    third = len(run.samples) // 3
    first, last = run.samples[:third], run.samples[-third:]
    rss_first = statistics.median(s.rss_bytes for s in first)
    rss_last = statistics.median(s.rss_bytes for s in last)
    assert rss_last <= rss_first * MAX_RSS_GROWTH, (rss_first, rss_last)
    assert max(s.fds for s in last) <= max(s.fds for s in first) * MAX_FD_GROWTH + COUNT_SLACK
    assert max(s.threads for s in last) <= max(s.threads for s in first) + COUNT_SLACK
    assert max(s.connections for s in last) <= max(s.connections for s in first) + COUNT_SLACK
    assert max(s.queue for s in last) <= max(max(s.queue for s in first), PROFILE.agents / 10)
    lingering = [
        (a.at_s, b.zombies)
        for a, b in zip(run.samples, run.samples[1:], strict=False)
        if a.zombies and b.zombies
    ]
    assert lingering == [], "zombie children lingered across samples"
    assert wait_for(lambda: sample(daemon, 0.0).zombies == 0, what="no zombies at the end")
    early, late = windowed_p99s([latency for _, latency in run.latencies_s])
    assert late <= early * MAX_P99_GROWTH, (early, late)
    periods = PROFILE.duration_s / PROFILE.heartbeat_period_s
    expected = PROFILE.agents * periods
    accepted = run.accepted_after - run.accepted_before
    assert accepted >= expected * 0.5, (
        f"{accepted} of ~{expected} heartbeats:\n{sender_output[-2000:]}"
    )
