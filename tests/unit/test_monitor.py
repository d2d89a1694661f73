"""The resource monitor: ring buffers on a fake clock, and /proc samples of real children."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.daemon.clock import FakeClock, SystemClock
from reconciler.daemon.monitor import (
    PointRing,
    ProcSampler,
    ResourceMonitor,
    ResourcePoint,
    TreeRoot,
    TreeUsage,
    buffer_capacity,
)
from reconciler.model import AgentId

A = AgentId("a")
B = AgentId("b")


class FakeSampler:
    """Reports fixed usage for every root it is given, or raises when told to."""

    def __init__(self) -> None:
        self.usage: dict[int, TreeUsage] = {}
        self.fail = False
        self.calls = 0
        self.during: list[Callable[[], None]] = []

    def sample(self, roots: Mapping[AgentId, TreeRoot]) -> dict[AgentId, TreeUsage]:
        self.calls += 1
        if self.fail:
            raise OSError("proc went away")
        for action in self.during:
            action()
        return {a: self.usage[r.pid] for a, r in roots.items() if r.pid in self.usage}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sampler() -> FakeSampler:
    fake = FakeSampler()
    fake.usage = {100: TreeUsage(12.5, 4096, 1), 200: TreeUsage(0.0, 8192, 3)}
    return fake


def monitor_of(
    clock: FakeClock,
    sampler: FakeSampler,
    *,
    retention_s: float = 3600.0,
    on_sample: Callable[[Mapping[AgentId, ResourcePoint]], None] | None = None,
) -> ResourceMonitor:
    return ResourceMonitor(
        clock=clock, sampler=sampler, interval_s=5.0, retention_s=retention_s, on_sample=on_sample
    )


# -- buffers on a fake clock ------------------------------------------------------------


def test_the_default_buffer_holds_an_hour_at_five_seconds() -> None:
    assert buffer_capacity(interval_s=5.0, retention_s=3600.0) == 720
    assert buffer_capacity(interval_s=7.0, retention_s=10.0) == 2


@pytest.mark.parametrize(
    ("interval_s", "retention_s"),
    [
        pytest.param(0.0, 60.0, id="zero-interval"),
        pytest.param(-1.0, 60.0, id="negative-interval"),
        pytest.param(5.0, float("nan"), id="nan-retention"),
        pytest.param(float("inf"), 60.0, id="infinite-interval"),
    ],
)
def test_nonsense_intervals_are_refused(interval_s: float, retention_s: float) -> None:
    with pytest.raises(ValueError, match="monitor"):
        buffer_capacity(interval_s=interval_s, retention_s=retention_s)


async def test_a_sweep_records_a_point_per_tracked_agent(
    clock: FakeClock, sampler: FakeSampler
) -> None:
    monitor = monitor_of(clock, sampler)
    monitor.track(A, 100)
    monitor.track(B, 200)
    latest = await monitor.sweep()
    assert latest == {
        A: ResourcePoint(clock.wall(), 12.5, 4096),
        B: ResourcePoint(clock.wall(), 0.0, 8192),
    }
    assert monitor.points(A, since_wall_s=0.0) == [latest[A]]


async def test_the_ring_buffer_keeps_only_the_newest_points(
    clock: FakeClock, sampler: FakeSampler
) -> None:
    monitor = monitor_of(clock, sampler, retention_s=20.0)
    monitor.track(A, 100)
    for _ in range(10):
        await monitor.sweep()
        clock.advance(5.0)
    points = monitor.points(A, since_wall_s=0.0)
    assert monitor.capacity == 4
    assert [p.time_wall_s for p in points] == [clock.wall() - 5.0 * n for n in (4, 3, 2, 1)]


_POINTS = st.lists(
    st.builds(
        ResourcePoint,
        st.floats(0, 1e10, allow_nan=False),
        st.floats(0, 1e4, allow_nan=False),
        st.integers(0, 2**62),
    ),
    max_size=40,
)


@given(capacity=st.integers(1, 12), points=_POINTS, since=st.floats(0, 1e10, allow_nan=False))
def test_a_point_ring_answers_like_a_bounded_deque(
    capacity: int, points: list[ResourcePoint], since: float
) -> None:
    ring, model = PointRing(capacity), deque[ResourcePoint](maxlen=capacity)
    for point in points:
        ring.append(point)
        model.append(point)
        assert ring.latest() == model[-1]
        assert len(ring) == len(model)
    assert ring.since(0.0) == list(model)
    assert ring.since(since) == [p for p in model if p.time_wall_s >= since]


def test_a_point_ring_grows_as_points_come_and_adds_nothing_for_the_collector() -> None:
    ring = PointRing(720)
    assert len(ring) == 0
    assert ring.latest() is None
    assert ring.since(0.0) == []
    ring.append(ResourcePoint(1.0, 2.0, -5))  # a negative reading is stored as 0
    ring.append(ResourcePoint(2.0, 3.0, 2**70))  # and a huge one clamped, not an error
    assert ring.since(0.0) == [ResourcePoint(1.0, 2.0, 0), ResourcePoint(2.0, 3.0, 2**63 - 1)]
    assert ring.capacity == 720
    assert len(ring) == 2
    tracked = len(gc.get_objects())
    for n in range(500):
        ring.append(ResourcePoint(float(n), 1.0, n))
    assert len(gc.get_objects()) <= tracked  # numbers in columns, not objects to walk
    with pytest.raises(ValueError, match="at least one point"):
        PointRing(0)


async def test_points_are_filtered_by_their_wall_time(
    clock: FakeClock, sampler: FakeSampler
) -> None:
    monitor = monitor_of(clock, sampler)
    monitor.track(A, 100)
    start = clock.wall()
    for _ in range(6):
        await monitor.sweep()
        clock.advance(5.0)
    assert len(monitor.points(A, since_wall_s=start + 15.0)) == 3
    assert monitor.points(A, since_wall_s=clock.wall()) == []
    assert monitor.points(AgentId("unknown"), since_wall_s=0.0) == []


async def test_the_callback_gets_the_latest_point_of_every_agent_in_one_call(
    clock: FakeClock, sampler: FakeSampler
) -> None:
    calls: list[dict[AgentId, ResourcePoint]] = []
    monitor = monitor_of(clock, sampler, on_sample=lambda latest: calls.append(dict(latest)))
    monitor.track(A, 100)
    monitor.track(B, 200)
    await monitor.sweep()
    assert len(calls) == 1
    assert set(calls[0]) == {A, B}


async def test_a_failing_callback_is_counted_and_sampling_goes_on(
    clock: FakeClock, sampler: FakeSampler
) -> None:
    def explode(latest: Mapping[AgentId, ResourcePoint]) -> None:
        raise RuntimeError("boom")

    monitor = monitor_of(clock, sampler, on_sample=explode)
    monitor.track(A, 100)
    await monitor.sweep()
    await monitor.sweep()
    assert monitor.errors == 2
    assert len(monitor.points(A, since_wall_s=0.0)) == 2


async def test_a_failing_sweep_is_counted_and_records_nothing(
    clock: FakeClock, sampler: FakeSampler
) -> None:
    monitor = monitor_of(clock, sampler)
    monitor.track(A, 100)
    sampler.fail = True
    assert await monitor.sweep() == {}
    assert monitor.errors == 1
    assert monitor.points(A, since_wall_s=0.0) == []


async def test_an_agent_untracked_during_a_sweep_gets_no_point(
    clock: FakeClock, sampler: FakeSampler
) -> None:
    monitor = monitor_of(clock, sampler)
    monitor.track(A, 100)
    monitor.track(B, 200)
    sampler.during = [lambda: monitor.untrack(A), lambda: monitor.track(B, 300)]
    assert await monitor.sweep() == {}


async def test_untrack_keeps_history_and_forget_drops_it(
    clock: FakeClock, sampler: FakeSampler
) -> None:
    monitor = monitor_of(clock, sampler)
    monitor.track(A, 100)
    await monitor.sweep()
    monitor.untrack(A)
    await monitor.sweep()
    assert len(monitor.points(A, since_wall_s=0.0)) == 1
    assert monitor.tracked() == {}
    monitor.forget(A)
    assert monitor.points(A, since_wall_s=0.0) == []
    assert monitor.latest(A) is None


async def test_nothing_tracked_means_no_sampling(clock: FakeClock, sampler: FakeSampler) -> None:
    monitor = monitor_of(clock, sampler)
    assert await monitor.sweep() == {}
    assert sampler.calls == 0


async def test_run_sweeps_repeatedly_and_stops_cleanly_when_cancelled(
    clock: FakeClock, sampler: FakeSampler
) -> None:
    monitor = ResourceMonitor(clock=clock, sampler=sampler, interval_s=0.01, retention_s=1.0)
    monitor.track(A, 100)
    task = asyncio.create_task(monitor.run())
    deadline = time.monotonic() + 10.0
    while monitor.sweeps < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert monitor.sweeps >= 3
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


# -- ProcSampler on a made-up /proc ------------------------------------------------------


def stat_line(pid: int, comm: str, *, ppid: int, session: int, ticks: int, rss: int) -> str:
    # fields 3..24: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
    # utime stime cutime cstime priority nice threads itrealvalue starttime vsize rss
    fields = ["S", ppid, session, session, 0, -1, 0, 0, 0, 0, 0, ticks, 0, 0, 0, 20, 0, 1, 0]
    fields += [1000 + pid, 0, rss]
    return f"{pid} ({comm}) " + " ".join(str(f) for f in fields) + " 0 0 0\n"


@pytest.fixture
def fake_proc(tmp_path: Path) -> Path:
    table = [
        (10, "agent ) (x", 1, 10, 10),  # a session leader with a hostile command name
        (11, "child", 10, 10, 20),  # its child
        (12, "grandchild", 11, 10, 30),  # its grandchild
        (13, "escaped", 1, 10, 40),  # double-forked away, still in the session
        (14, "new-session", 12, 14, 50),  # a descendant that started its own session
        (20, "stranger", 1, 20, 1000),  # someone else's process
    ]
    for pid, comm, ppid, session, rss in table:
        (tmp_path / str(pid)).mkdir()
        line = stat_line(pid, comm, ppid=ppid, session=session, ticks=0, rss=rss)
        (tmp_path / str(pid) / "stat").write_text(line)
    (tmp_path / "self").mkdir()
    (tmp_path / "99").mkdir()  # a process that exited between listing and reading
    return tmp_path


def test_a_tree_is_the_descendants_and_the_session(fake_proc: Path) -> None:
    usage = ProcSampler(str(fake_proc)).sample({A: TreeRoot(10)})
    page = os.sysconf("SC_PAGE_SIZE")
    assert usage[A].processes == 5
    assert usage[A].memory_bytes == (10 + 20 + 30 + 40 + 50) * page


def test_a_dead_root_or_a_reused_pid_is_not_sampled(fake_proc: Path) -> None:
    usage = ProcSampler(str(fake_proc)).sample(
        {A: TreeRoot(77), B: TreeRoot(10, start_ticks=1), AgentId("c"): TreeRoot(20, 1020)}
    )
    assert list(usage) == [AgentId("c")]


# -- ProcSampler on real children --------------------------------------------------------

BUSY = "while True: pass"
IDLE = "import time; time.sleep(120)"
FORKS_A_BUSY_CHILD = (
    "import subprocess, sys, time;"
    "subprocess.Popen([sys.executable, '-c', 'while True: pass']);"
    "time.sleep(120)"
)


Spawn = Callable[[str], "subprocess.Popen[bytes]"]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    children: list[subprocess.Popen[bytes]] = []

    def start(code: str) -> subprocess.Popen[bytes]:
        child = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
        children.append(child)
        return child

    yield start
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=30)


async def sample_until(
    monitor: ResourceMonitor,
    agent: AgentId,
    ok: Callable[[ResourcePoint], bool],
    *,
    timeout_s: float = 20.0,
) -> ResourcePoint:
    deadline = time.monotonic() + timeout_s
    while True:
        point = (await monitor.sweep()).get(agent)
        if point is not None and ok(point):
            return point
        assert time.monotonic() < deadline, f"last point {point}"
        await asyncio.sleep(0.05)


async def test_a_busy_child_shows_cpu_and_memory(spawn: Spawn) -> None:
    busy = spawn(BUSY)
    idle = spawn(IDLE)
    monitor = ResourceMonitor(clock=SystemClock(), interval_s=0.1)
    monitor.track(A, busy.pid)
    monitor.track(B, idle.pid)
    point = await sample_until(monitor, A, lambda p: p.cpu_percent > 20.0)
    assert point.memory_bytes > 1024 * 1024
    idle_point = monitor.latest(B)
    assert idle_point is not None
    assert idle_point.memory_bytes > 0


async def test_cpu_is_summed_over_the_process_tree(spawn: Spawn) -> None:
    parent = spawn(FORKS_A_BUSY_CHILD)
    sampler = ProcSampler()
    monitor = ResourceMonitor(clock=SystemClock(), interval_s=0.1, sampler=sampler)
    monitor.track(A, parent.pid)
    deadline = time.monotonic() + 20.0
    while sampler.sample({A: TreeRoot(parent.pid)}).get(A, TreeUsage(0, 0, 0)).processes < 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    # After the first sweep each process is charged only its recent ticks: the sleeping
    # parent adds about nothing, so the busy share can only come from the child.
    point = await sample_until(monitor, A, lambda p: monitor.sweeps >= 2 and p.cpu_percent > 20.0)
    lone = spawn(IDLE)
    lone_usage = sampler.sample({B: TreeRoot(lone.pid)})[B]
    assert point.memory_bytes > 1.5 * lone_usage.memory_bytes, "two interpreters' memory"


async def test_an_exited_child_gets_no_more_points(spawn: Spawn) -> None:
    child = spawn(IDLE)
    monitor = ResourceMonitor(clock=SystemClock(), interval_s=0.1)
    monitor.track(A, child.pid)
    assert A in await monitor.sweep()
    child.kill()
    child.wait(timeout=30)
    assert await monitor.sweep() == {}
    assert len(monitor.points(A, since_wall_s=0.0)) == 1
