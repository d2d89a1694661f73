"""A process SIGKILLed while saving leaves the old or the new state, never a broken one.

Each test saves generation N here, then runs a real child process that saves N+1 over
it with ``RECONCILER_FAILPOINTS=<point>=kill``, so the kernel kills it at that exact
step; the test then loads the directory as a restarted daemon would.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reconciler.daemon.clock import FakeClock, SystemClock
from reconciler.daemon.store import (
    PROCESSES_FILE,
    DesiredStateStore,
    ProcessEntry,
)
from reconciler.model import AgentId, AgentSpec, Generation, NodeDesiredState

SAVE_NEXT = """
import sys
from pathlib import Path
from reconciler.daemon.clock import SystemClock
from reconciler.daemon.store import DesiredStateStore
from reconciler.model import AgentId, AgentSpec, Generation, NodeDesiredState

state_dir, generation = Path(sys.argv[1]), int(sys.argv[2])
store = DesiredStateStore(state_dir, clock=SystemClock())
store.load()
agents = tuple(
    AgentSpec(id=AgentId(f"agent-{i}"), command=("/bin/sleep", str(generation)))
    for i in range(generation)
)
store.save(NodeDesiredState(generation=Generation(generation), agents=agents))
print("saved", flush=True)
"""

SAVE_PROCESSES = """
import sys
from pathlib import Path
from reconciler.daemon.clock import SystemClock
from reconciler.daemon.store import DesiredStateStore, ProcessEntry
from reconciler.model import AgentId

store = DesiredStateStore(Path(sys.argv[1]), clock=SystemClock())
entry = ProcessEntry(pid=2, start_ticks=2, cmdline=("new",), fingerprint="f", started_at_wall_s=0)
store.save_processes({AgentId("new"): entry})
print("saved", flush=True)
"""

SAVE_FOREVER = """
import sys
from pathlib import Path
from reconciler.daemon.clock import SystemClock
from reconciler.daemon.store import DesiredStateStore
from reconciler.model import AgentId, AgentSpec, Generation, NodeDesiredState

store = DesiredStateStore(Path(sys.argv[1]), clock=SystemClock())
generation = store.load().state.generation
print("ready", flush=True)
while True:
    generation += 1
    agents = tuple(
        AgentSpec(id=AgentId(f"agent-{i}"), command=("/bin/sleep", str(generation)))
        for i in range(generation % 50)
    )
    store.save(NodeDesiredState(generation=generation, agents=agents))
"""


def state_of(generation: int) -> NodeDesiredState:
    agents = tuple(
        AgentSpec(id=AgentId(f"agent-{i}"), command=("/bin/sleep", str(generation)))
        for i in range(generation)
    )
    return NodeDesiredState(generation=Generation(generation), agents=agents)


def run_child(script: str, *args: str, failpoint: str) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, RECONCILER_FAILPOINTS=f"{failpoint}=kill")
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("point", "survives"),
    [
        pytest.param("store.before_write", 3, id="before-write"),
        pytest.param("store.after_tmp_write", 3, id="after-tmp-write"),
        pytest.param("store.after_tmp_fsync", 3, id="after-tmp-fsync"),
        pytest.param("store.after_rename", 4, id="after-rename"),
        pytest.param("store.after_dir_fsync", 4, id="after-dir-fsync"),
    ],
)
def test_a_daemon_killed_at_each_step_of_saving_leaves_old_or_new(
    tmp_path: Path, point: str, survives: int
) -> None:
    DesiredStateStore(tmp_path, clock=FakeClock()).save(state_of(3))
    child = run_child(SAVE_NEXT, str(tmp_path), "4", failpoint=point)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    assert b"saved" not in child.stdout
    result = DesiredStateStore(tmp_path, clock=FakeClock()).load()
    assert result.corrupt is None
    assert result.state == state_of(survives)
    assert not list(tmp_path.glob(".*.tmp")), "the restarted store cleaned up the temp file"


@pytest.mark.parametrize(
    ("point", "survivor"),
    [
        pytest.param("store.processes.after_tmp_write", "old", id="after-tmp-write"),
        pytest.param("store.processes.after_rename", "new", id="after-rename"),
    ],
)
def test_a_daemon_killed_while_recording_pids_leaves_old_or_new(
    tmp_path: Path, point: str, survivor: str
) -> None:
    old = ProcessEntry(pid=1, start_ticks=1, cmdline=("old",), fingerprint="f", started_at_wall_s=0)
    DesiredStateStore(tmp_path, clock=FakeClock()).save_processes({AgentId("old"): old})
    child = run_child(SAVE_PROCESSES, str(tmp_path), failpoint=point)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    store = DesiredStateStore(tmp_path, clock=FakeClock())
    assert list(store.load_processes()) == [AgentId(survivor)]
    assert store.corrupt_files == ()
    assert (tmp_path / PROCESSES_FILE).exists()


@pytest.mark.slow
def test_killing_a_saving_process_at_random_moments_never_breaks_the_file(
    tmp_path: Path,
) -> None:
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    seen: list[int] = []
    for _ in range(12):
        child = subprocess.Popen(
            [sys.executable, "-c", SAVE_FOREVER, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n", f"seed {seed}"
        time.sleep(rng.uniform(0.0, 0.05))  # a random kill moment, not synchronisation
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
        assert child.stderr is not None
        child.stderr.close()
        result = DesiredStateStore(tmp_path, clock=SystemClock()).load()
        assert result.corrupt is None, f"seed {seed}: {result.corrupt}"
        seen.append(result.state.generation)
    assert seen == sorted(seen), f"seed {seed}: generations went back: {seen}"
    assert seen[-1] > 0, f"seed {seed}: nothing was ever saved"
