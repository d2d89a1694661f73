"""The faults, one function each, and the seeded schedules that order them.

Each fault takes the ``Scenario``, breaks one thing, clears it again and hands back
through ``Scenario.cleared`` (which pushes the desired state, waits for convergence,
times it, and checks that the healthy agents the fault did not touch kept their pid).

Faults of the daemon alone (``STANDALONE``):

- ``daemon-failpoint:<name>``: the daemon restarts with ``<name>=kill`` and is given a
  change that reaches the point; it dies there (SIGKILL from inside), restarts clean.
- ``daemon-kill``: SIGKILL at a random moment within 0.3 s of a pushed change.
- ``agent-kill``, ``agent-pause`` (SIGSTOP for 0.2-8 s, then SIGCONT),
  ``agent-fork-exit`` (the forking agent forks two grandchildren and exits).
- ``disk-full``: the state tmpfs filled to ENOSPC while a change arrives; freed.
- ``fsync-eio``: strace makes every fsync fail with EIO while a change arrives.
- ``clock-jump:forward`` / ``clock-jump:back``: the daemon's wall clock jumps by an
  hour to a week and back again, sometimes with a daemon restart in between.

Faults with a Manager (``WITH_MANAGER``): ``manager-kill``, ``manager-mid-push``
(killed at the ``manager.mid_push`` failpoint), ``proxy:<delay|blackhole|reset|refuse>``
between the daemon and the Manager, plus ``daemon-kill`` and ``agent-kill`` there too.

A schedule first runs every fault of its list once (in a seeded order), then draws
at random by weight, so even the short profile covers each kind.

What it does not do: judge (``invariants``) or wait for convergence (``runner``).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable
from functools import partial

import grpc

from tests.robustness import procs
from tests.robustness.node import FsyncFailure
from tests.robustness.runner import Scenario, kill
from tests.support.daemon import wait_for
from tests.support.faultproxy import Blackhole, Delay, Mode, Pass, Refuse, Reset

__all__ = ["STANDALONE", "WITH_MANAGER", "Fault", "schedule"]

Fault = Callable[[Scenario], None]

DAEMON_FAILPOINTS = (
    "store.before_write",
    "store.after_tmp_write",
    "store.after_tmp_fsync",
    "store.after_rename",
    "store.after_dir_fsync",
    "controller.after_persist",
    "supervisor.after_spawn_before_record",
    "reconcile.mid_pass",
)


# ------------------------------------------------------------------------ daemon


def _start_expecting_death(run: Scenario) -> bool:
    """Start the daemon; False when it died (at its failpoint) before serving."""
    try:
        run.daemon.start()
    except AssertionError:
        if run.daemon.alive:
            raise
        return False
    return True


def daemon_failpoint(point: str, run: Scenario) -> None:
    name = f"daemon-failpoint:{point}"
    kept = run.healthy()
    run.daemon.terminate()
    run.daemon.env = {"RECONCILER_FAILPOINTS": f"{point}=kill"}
    touched: set[str] = set()
    if _start_expecting_death(run):
        touched = run.change(start=point.startswith("supervisor."))
        run.push_desired()
        with contextlib.suppress(TimeoutError, grpc.RpcError):
            _wait_exit(run, timeout_s=5.0)
    fired = not run.daemon.alive and run.daemon.proc is not None
    run.stats.notes[f"{name} fired" if fired else f"{name} did not fire"] += 1
    run.daemon.kill()
    run.daemon.env = {}
    run.daemon.start()
    run.cleared(name, touched=touched, kept=kept)


def _wait_exit(run: Scenario, *, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while run.daemon.alive:
        run.check_always(run.observe())
        if time.monotonic() > end:
            raise TimeoutError
        time.sleep(0.02)


def daemon_kill(run: Scenario) -> None:
    kept = run.healthy()
    touched = run.change()
    sender = threading.Thread(target=_push_quietly, args=(run,))
    sender.start()
    time.sleep(run.rng.uniform(0.0, 0.3))
    run.daemon.kill()
    sender.join(timeout=30)
    run.watch(run.rng.uniform(0.0, 0.5))
    run.daemon.start()
    run.cleared("daemon-kill", touched=touched, kept=kept)


def _push_quietly(run: Scenario) -> None:
    with contextlib.suppress(grpc.RpcError):
        run.push_desired()


# ------------------------------------------------------------------------ agents


def _running_pick(run: Scenario, prefix: str = "") -> tuple[str, int] | None:
    running = sorted(
        (agent_id, view.pid)
        for agent_id, view in run.last_view.items()
        if view.phase == "AGENT_PHASE_RUNNING" and view.pid > 0 and agent_id.startswith(prefix)
    )
    return run.rng.choice(running) if running else None


def agent_kill(run: Scenario) -> None:
    picked = _running_pick(run)
    if picked is None:
        run.stats.notes["agent-kill: nothing running"] += 1
        return
    agent_id, pid = picked
    kept = run.healthy(exclude={agent_id})
    kill(pid)
    run.cleared("agent-kill", touched={agent_id}, kept=kept)


def agent_pause(run: Scenario) -> None:
    picked = _running_pick(run)
    if picked is None:
        run.stats.notes["agent-pause: nothing running"] += 1
        return
    agent_id, pid = picked
    kept = run.healthy(exclude={agent_id})
    kill(pid, signal.SIGSTOP)
    try:
        run.watch(run.rng.uniform(0.2, 8.0))
    finally:
        kill(pid, signal.SIGCONT)
    run.cleared("agent-pause", touched={agent_id}, kept=kept)


def agent_fork_exit(run: Scenario) -> None:
    if "fork-1" not in run.desired.intent(0).running:
        run.desired.agents["fork-1"] = (run.desired.agents.get("fork-1", (0, False))[0] + 1, True)
        run.confirmed_stopped.discard("fork-1")
        run.push_desired()
        run.settle(touched=set())
    view = run.last_view["fork-1"]
    usr1 = 1 << (signal.SIGUSR1 - 1)
    wait_for(lambda: procs.signals_caught(view.pid) & usr1, what="the forking agent's handler")
    kept = run.healthy(exclude={"fork-1"})
    kill(view.pid, signal.SIGUSR1)
    run.cleared("agent-fork-exit", touched={"fork-1"}, kept=kept)


# ------------------------------------------------------------------------ storage


def disk_full(run: Scenario) -> None:
    kept = run.healthy()
    run.tmpfs.fill()
    try:
        touched = run.change()
        acked = run.push_desired()
        run.stats.notes[
            "disk-full: change refused" if not acked else "disk-full: change acked"
        ] += 1
        run.watch(run.rng.uniform(0.2, 1.0))
    finally:
        run.tmpfs.free()
    run.cleared("disk-full", touched=touched, kept=kept)


def fsync_eio(run: Scenario) -> None:
    kept = run.healthy()
    failure = FsyncFailure(run.daemon.pid, run.root / "strace.log")
    failure.start()
    try:
        touched = run.change()
        acked = run.push_desired()
        run.stats.notes[
            "fsync-eio: change refused" if not acked else "fsync-eio: change acked"
        ] += 1
    finally:
        failure.stop()
    run.cleared("fsync-eio", touched=touched, kept=kept)


# ------------------------------------------------------------------------ clock


def clock_jump(direction: int, run: Scenario) -> None:
    name = f"clock-jump:{'forward' if direction > 0 else 'back'}"
    kept = run.healthy()
    offset_s = direction * run.rng.choice((3600, 86400, 7 * 86400))
    run.clock.set(offset_s)
    try:
        run.watch(run.rng.uniform(0.5, 2.5))
        if run.rng.random() < 0.3:
            run.stats.notes[f"{name}: daemon restarted while jumped"] += 1
            run.daemon.kill()
            run.daemon.start()
            run.watch(0.5)
    finally:
        run.clock.set(0)
    run.cleared(name, touched=set(), kept=kept)


# ------------------------------------------------------------------------ Manager


def manager_kill(run: Scenario) -> None:
    assert run.manager is not None
    kept = run.healthy()
    run.manager.kill()
    run.watch(run.rng.uniform(0.0, 2.0))
    run.manager.start()
    touched = run.change()
    run.cleared("manager-kill", touched=touched, kept=kept)


def manager_mid_push(run: Scenario) -> None:
    assert run.manager is not None
    kept = run.healthy()
    run.manager.terminate()
    run.manager.failpoints = "manager.mid_push=kill"
    run.manager.start()
    touched = run.change()
    run.push_desired()
    try:
        run.manager.wait_exit(timeout_s=10.0)
        run.stats.notes["manager-mid-push fired"] += 1
    except Exception:
        run.stats.notes["manager-mid-push did not fire"] += 1
        run.manager.kill()
    run.manager.failpoints = ""
    run.manager.start()
    run.cleared("manager-mid-push", touched=touched, kept=kept)


def proxy_fault(mode_name: str, run: Scenario) -> None:
    assert run.proxy is not None
    modes: dict[str, Mode] = {
        "delay": Delay(run.rng.uniform(0.05, 0.5), run.rng.uniform(0.0, 0.5)),
        "blackhole": Blackhole(),
        "reset": Reset(),
        "refuse": Refuse(),
    }
    kept = run.healthy()
    run.proxy.set_mode(modes[mode_name])
    try:
        touched = run.change()
        run.push_desired()
        run.watch(run.rng.uniform(0.5, 3.0))
    finally:
        run.proxy.set_mode(Pass())
    run.cleared(f"proxy:{mode_name}", touched=touched, kept=kept)


# ------------------------------------------------------------------------ schedules

#: (name, fault, weight): the weights favour cheap faults in long runs.
STANDALONE: list[tuple[str, Fault, float]] = [
    *((f"daemon-failpoint:{p}", partial(daemon_failpoint, p), 0.6) for p in DAEMON_FAILPOINTS),
    ("daemon-kill", daemon_kill, 3.0),
    ("agent-kill", agent_kill, 4.0),
    ("agent-pause", agent_pause, 2.0),
    ("agent-fork-exit", agent_fork_exit, 2.0),
    ("disk-full", disk_full, 1.5),
    ("fsync-eio", fsync_eio, 1.5),
    ("clock-jump:forward", partial(clock_jump, +1), 1.0),
    ("clock-jump:back", partial(clock_jump, -1), 1.0),
]

WITH_MANAGER: list[tuple[str, Fault, float]] = [
    ("manager-kill", manager_kill, 2.0),
    ("manager-mid-push", manager_mid_push, 1.5),
    *(
        (f"proxy:{m}", partial(proxy_fault, m), 1.0)
        for m in ("delay", "blackhole", "reset", "refuse")
    ),
    ("daemon-kill", daemon_kill, 1.5),
    ("agent-kill", agent_kill, 2.0),
]


def schedule(
    faults: list[tuple[str, Fault, float]], count: int, run: Scenario
) -> list[tuple[str, Fault]]:
    """``count`` faults: each of ``faults`` once in a seeded order, then drawn by weight."""
    first = [(name, fault) for name, fault, _ in faults]
    run.rng.shuffle(first)
    names = [(name, fault) for name, fault, _ in faults]
    weights = [weight for _, _, weight in faults]
    rest = run.rng.choices(names, weights=weights, k=max(0, count - len(first)))
    return (first + rest)[:count] if count >= len(first) else first[:count]
