"""The process supervisor: start, watch, stop and re-adopt agent processes.

This is the daemon's edge to the operating system. The controller asks it to
``start`` a spec, ``stop`` a handle or ``adopt`` a process that outlived a previous
daemon, and hears about every exit through one callback. ``Supervisor`` is the
Protocol the controller sees; ``ProcessSupervisor`` is the real thing and
``FakeSupervisor`` the in-memory stand-in for unit tests.

How a process is started
    ``subprocess.Popen`` with an argv list (never a shell), ``start_new_session``
    (own session and process group, so one ``killpg`` reaches the agent and its
    ordinary children), stdin from /dev/null, stdout and stderr appended to the
    agent's log file (``reconciler.daemon.agentlogs``; a file, not a pipe, so the
    agent survives the daemon), a small environment (PATH, LANG, HOME, the user's
    names, then ``spec.env``, then the caller's ``env``), and optionally another user
    through Popen's ``user``/``group``/``extra_groups`` (no ``preexec_fn``: it is not
    safe in a process with threads). Popen is used only to spawn: the object is
    disowned at once, because its own ``wait`` (or its ``__del__`` queueing the pid
    for a later ``waitpid``) would steal the exit status from the pidfd reader.
    Spawning runs on the event loop: a fork/exec costs 0.5-1 ms (DESIGN.md section 9),
    and keeping it there means no reaper can run between the fork and the tracking.

How an exit is seen
    Each tracked process has a pidfd (``os.pidfd_open``) registered with
    ``loop.add_reader``; it becomes readable the moment the process exits (~0.2 ms
    after a SIGKILL), with no thread per child and no polling. The reader reaps with
    ``waitid(P_PIDFD, fd, WEXITED)``, which gives the exit code or signal for our own
    children. An adopted process is usually not our child (its parent, the previous
    daemon, is gone): ``waitid`` answers ECHILD and the exit is reported with an
    unknown status, ``ExitInfo(code=None, signal=None)``. When one of our children
    fails (a non-zero code or a signal), the last line it printed is read back from
    its log file into ``ExitInfo.output`` (``failure_output``; off, output stays on
    the node).

Why the daemon is a child subreaper
    An agent that forks and lets its children outlive it (a daemonising helper, a
    double fork, a ``setsid`` grandchild) would hand them to init, out of our sight,
    and ``stop`` could not find them. With PR_SET_CHILD_SUBREAPER the kernel
    re-parents such orphans to the daemon instead: ``stop`` finds them (as our
    children carrying the agent's ``RECONCILER_AGENT_ID``), and when they exit they
    are our zombies to reap. So the daemon also reaps on SIGCHLD: it peeks with
    ``waitid(P_ALL, WEXITED|WNOHANG|WNOWAIT)`` and reaps only pids no supervisor
    tracks by pidfd (those belong to their pidfd reader, which needs the status).
    The consequence: the daemon must start child processes only through this module,
    since any other untracked child would be reaped here too. The flag is best
    effort (it needs Linux 3.4) and is cleared when the last supervisor closes.

How a process is stopped
    Collect the descendants first (parent links in /proc, the agent's session, and
    re-parented orphans marked with the agent's id), open a pidfd on each and check
    its start time (so a recycled pid is never signalled), then SIGTERM the process
    group, the main process and every descendant; wait up to ``grace_s`` for all of
    them; then SIGKILL the group and every one still alive, including any forked
    during the grace period. ``stop`` returns once they are gone, and is idempotent.
    Stops that begin in the same pass of the event loop (a generation that drops a
    thousand agents, a daemon stopping its agents on exit) share one read of /proc:
    a read per stop would cost O(agents x processes) with the loop stopped.

Adoption identity
    pid, start time in clock ticks since boot (/proc/PID/stat field 22) and command
    line must all match (``procfs.cmdline_matches``); start ticks are per boot, so the
    caller should also keep ``procfs.boot_id()`` with what it records.

What it does not do: decide when to start or stop (``reconciler.reconcile``), check
the allow-list at validation time (``reconciler.daemon.commands``; an optional
``command_policy`` here re-checks it at spawn), sample cpu and memory (the monitor).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import pwd
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from reconciler.daemon import procfs
from reconciler.daemon.agentlogs import AgentLogs
from reconciler.daemon.clock import Clock, SystemClock
from reconciler.daemon.commands import CommandPolicy
from reconciler.model.errors import InvalidArgument
from reconciler.model.ids import AgentId
from reconciler.model.spec import AgentSpec
from reconciler.model.status import ExitInfo

__all__ = [
    "AGENT_CONFIG_FILE_ENV",
    "AGENT_ID_ENV",
    "ExitCallback",
    "FakeStart",
    "FakeSupervisor",
    "ProcessHandle",
    "ProcessSupervisor",
    "RunAs",
    "SpawnError",
    "Supervisor",
    "spawn_process",
]

_log = logging.getLogger(__name__)

#: Set in every agent's environment; inherited by its children, it lets ``stop`` tell
#: which agent a re-parented orphan came from.
AGENT_ID_ENV = "RECONCILER_AGENT_ID"
AGENT_CONFIG_FILE_ENV = "RECONCILER_AGENT_CONFIG_FILE"

_PR_SET_CHILD_SUBREAPER = 36
_MAX_VICTIMS = 1024
"""At most this many descendants get their own pidfd in one stop (the group kill
still reaches the rest); bounds descriptor use against a fork bomb."""
_MAX_REAPS_PER_SIGNAL = 4096
_SPURIOUS_RETRY_S = 0.01


@dataclass(frozen=True, slots=True)
class ProcessHandle:
    """One running agent process, as the controller records it."""

    agent_id: AgentId
    pid: int
    start_ticks: int
    """/proc/PID/stat field 22 (``starttime``): with pid and cmdline, its identity."""
    cmdline: tuple[str, ...]
    """The argv actually executed (absolute argv[0])."""


ExitCallback = Callable[[ProcessHandle, ExitInfo], None]


class SpawnError(Exception):
    """The process could not be started; the message says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Supervisor(Protocol):
    """What the controller needs from the process edge."""

    def set_exit_callback(self, callback: ExitCallback) -> None:
        """Call ``callback`` once for every tracked process that ends."""
        ...

    async def start(self, spec: AgentSpec, *, env: Mapping[str, str]) -> ProcessHandle:
        """Spawn ``spec``; ``env`` is merged over ``spec.env``. Raises ``SpawnError``."""
        ...

    async def stop(self, handle: ProcessHandle, *, grace_s: float) -> None:
        """SIGTERM the group and descendants, SIGKILL after ``grace_s``; return once gone."""
        ...

    def adopt(
        self, agent_id: AgentId, *, pid: int, start_ticks: int, cmdline: Sequence[str]
    ) -> ProcessHandle | None:
        """Watch a process that outlived a previous daemon, if it is still the same one."""
        ...

    def descendants(self, handle: ProcessHandle) -> list[int]:
        """The live pids that belong to the agent besides its main process."""
        ...

    async def close(self) -> None:
        """Stop watching; leave the agents running."""
        ...


# --------------------------------------------------------------------------- real


@dataclass(frozen=True, slots=True)
class RunAs:
    """The account an agent runs as, resolved from its spec's ``user``."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str

    @property
    def is_self(self) -> bool:
        return self.uid == os.geteuid() and self.gid == os.getegid()


@dataclass(slots=True)
class _Tracked:
    handle: ProcessHandle
    pidfd: int
    spawned: bool
    leads_group: bool
    done: asyncio.Future[ExitInfo]


@dataclass(slots=True)
class _ChildReaper:
    """Process-wide: the subreaper flag and reaping of children nobody tracks."""

    supervisors: list[ProcessSupervisor] = field(default_factory=list)
    loops: dict[asyncio.AbstractEventLoop, int] = field(default_factory=dict)
    subreaper_users: int = 0

    def join(self, supervisor: ProcessSupervisor, loop: asyncio.AbstractEventLoop) -> None:
        self.supervisors.append(supervisor)
        if supervisor.subreaper:
            self.subreaper_users += 1
            if self.subreaper_users == 1:
                _set_subreaper(True)
        self.loops[loop] = self.loops.get(loop, 0) + 1
        if self.loops[loop] == 1:
            _watch_sigchld(loop, self.reap)

    def leave(self, supervisor: ProcessSupervisor, loop: asyncio.AbstractEventLoop) -> None:
        self.supervisors.remove(supervisor)
        if supervisor.subreaper:
            self.subreaper_users -= 1
            if self.subreaper_users == 0:
                _set_subreaper(False)
        self.loops[loop] -= 1
        if self.loops[loop] == 0:
            del self.loops[loop]
            if not loop.is_closed():
                with contextlib.suppress(RuntimeError, ValueError):
                    loop.remove_signal_handler(signal.SIGCHLD)

    def is_tracked(self, pid: int) -> bool:
        return any(supervisor.tracks(pid) for supervisor in self.supervisors)

    def reap(self) -> int:
        """Reap every exited child no supervisor tracks; return how many."""
        return self._reap(deferred=False)

    def _reap(self, *, deferred: bool) -> int:
        reaped = 0
        for _ in range(_MAX_REAPS_PER_SIGNAL):
            try:
                peek = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return reaped
            if peek is None:
                return reaped
            if self.is_tracked(peek.si_pid):
                # A tracked zombie waits for its pidfd reader and hides any others
                # from P_ALL. Its reader is already queued (the pidfd turned readable
                # with the same exit that sent SIGCHLD): look again after it ran, and
                # only then search our children one by one.
                if not deferred and self._defer():
                    return reaped
                return reaped + self._reap_untracked_zombies()
            reaped += _reap_pid(peek.si_pid)
        return reaped

    def _defer(self) -> bool:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        loop.call_soon(functools.partial(self._reap, deferred=True))
        return True

    def _reap_untracked_zombies(self) -> int:
        reaped = 0
        for pid in procfs.children_of(os.getpid()):
            stat = procfs.read_stat(pid)
            if stat is not None and stat.zombie and not self.is_tracked(pid):
                reaped += _reap_pid(pid)
        return reaped


_REAPER = _ChildReaper()


class ProcessSupervisor:
    """Starts agents as real processes and watches them through pidfds."""

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        *,
        log_max_bytes: int = 10 * 1024 * 1024,
        log_backups: int = 3,
        allow_root: bool = False,
        clock: Clock | None = None,
        command_policy: CommandPolicy | None = None,
        default_working_dir: str = "/",
        subreaper: bool = True,
        kill_wait_s: float = 10.0,
        failure_output: bool = True,
    ) -> None:
        """``default_working_dir`` serves specs without ``working_dir``; ``kill_wait_s``
        bounds the wait after SIGKILL (a process in disk wait may take a while);
        ``failure_output`` reads a failed child's last line into its ``ExitInfo``."""
        self.logs = AgentLogs(log_dir, max_bytes=log_max_bytes, backups=log_backups)
        self.allow_root = allow_root
        self.subreaper = subreaper
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._policy = command_policy
        self._default_working_dir = default_working_dir
        self._kill_wait_s = kill_wait_s
        self._failure_output = failure_output
        self._callback: ExitCallback | None = None
        self._tracked: dict[int, _Tracked] = {}
        self._stopping: dict[int, asyncio.Task[None]] = {}
        self._table: list[procfs.ProcStat] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # -- the Supervisor protocol

    def set_exit_callback(self, callback: ExitCallback) -> None:
        """Call ``callback(handle, exit_info)`` once for every tracked process that ends."""
        self._callback = callback

    async def start(self, spec: AgentSpec, *, env: Mapping[str, str]) -> ProcessHandle:
        """Spawn ``spec`` in its own session; raise ``SpawnError`` saying why it cannot.

        Returns once the kernel has accepted the exec; the new program may still be
        loading (its /proc command line can read empty for a fraction of a millisecond).
        """
        loop = self._bind_loop()
        argv = self._argv(spec)
        user = self._resolve_user(spec.user)
        cwd = self._working_dir(spec)
        environ = _environment(spec, env, user)
        config_fd = _hand_over_config(environ, user) if user and not user.is_self else None
        try:
            log_fd = self.logs.open_for_start(spec.id)
        except OSError as error:
            if config_fd is not None:
                os.close(config_fd)
            raise SpawnError(f"cannot open the log file of {spec.id}: {error}") from None
        passed = () if config_fd is None else (config_fd,)
        try:
            before_ns = procfs.boot_clock_ns()
            pid = spawn_process(
                argv, cwd=cwd, env=environ, user=user, log_fd=log_fd, pass_fds=passed
            )
            start_ticks = procfs.start_ticks_between(before_ns, procfs.boot_clock_ns())
        finally:
            os.close(log_fd)
            for fd in passed:
                os.close(fd)
        return self._track_spawned(spec.id, pid, argv, loop, start_ticks=start_ticks)

    async def stop(self, handle: ProcessHandle, *, grace_s: float) -> None:
        """SIGTERM the group and descendants, SIGKILL after ``grace_s``; return once gone."""
        task = self._stopping.get(handle.pid)
        if task is None:
            entry = self._tracked.get(handle.pid)
            if entry is None or entry.handle != handle:
                return
            task = asyncio.ensure_future(self._stop(entry, max(0.0, grace_s)))
            self._stopping[handle.pid] = task
            task.add_done_callback(lambda _: self._stopping.pop(handle.pid, None))
        await asyncio.shield(task)

    def adopt(
        self, agent_id: AgentId, *, pid: int, start_ticks: int, cmdline: Sequence[str]
    ) -> ProcessHandle | None:
        """Watch ``pid`` again if it is alive with the same start ticks and cmdline."""
        loop = self._bind_loop()
        existing = self._tracked.get(pid)
        if existing is not None:
            same = (
                existing.handle.start_ticks == start_ticks and existing.handle.agent_id == agent_id
            )
            return existing.handle if same else None
        if pid <= 0:
            return None
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return None
        # Read the identity after opening the pidfd: if it still matches, the pidfd
        # refers to that very process, whatever happens to the pid number later.
        stat = procfs.read_stat(pid)
        if (
            stat is None
            or stat.zombie
            or stat.start_ticks != start_ticks
            or not procfs.cmdline_matches(cmdline, procfs.read_cmdline(pid))
        ):
            os.close(pidfd)
            return None
        handle = ProcessHandle(agent_id, pid, start_ticks, tuple(cmdline))
        self._track(handle, pidfd, spawned=False, leads_group=stat.pgid == pid, loop=loop)
        _log.info("adopted pid %d", pid, extra={"agent_id": agent_id})
        return handle

    def descendants(self, handle: ProcessHandle) -> list[int]:
        """The live pids of the agent's tree, session and re-parented orphans."""
        return sorted(stat.pid for stat in self._victim_stats(handle))

    async def close(self) -> None:
        """Stop watching every process and leave them running (they can be adopted)."""
        if self._closed:
            return
        self._closed = True
        for entry in list(self._tracked.values()):
            self._untrack(entry)
            if not entry.done.done():
                entry.done.cancel()
        if self._loop is not None:
            _REAPER.leave(self, self._loop)

    # -- more for the controller and tests

    def tracks(self, pid: int) -> bool:
        """True while ``pid`` is watched (and will be reaped) by this supervisor."""
        return pid in self._tracked

    def handles(self) -> list[ProcessHandle]:
        """Every process watched now."""
        return [entry.handle for entry in self._tracked.values()]

    def reap_orphans(self) -> int:
        """Reap exited children nobody tracks (SIGCHLD does this; a timer may too)."""
        return _REAPER.reap()

    # -- starting

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        if self._closed:
            raise RuntimeError("the supervisor is closed")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            _REAPER.join(self, loop)
        elif self._loop is not loop:
            raise RuntimeError("a supervisor serves the event loop it first ran on")
        return loop

    def _argv(self, spec: AgentSpec) -> tuple[str, ...]:
        if not spec.command or not spec.command[0].startswith("/"):
            raise SpawnError(
                f"command {list(spec.command)!r} has no absolute program path "
                "(commands are resolved through CommandPolicy before start)"
            )
        if self._policy is None:
            return tuple(spec.command)
        try:
            return self._policy.resolve(spec.command, field=f"{spec.id}.command")
        except InvalidArgument as error:
            raise SpawnError(str(error)) from None

    def _resolve_user(self, name: str) -> RunAs | None:
        if not name:
            return None
        try:
            entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
        except (KeyError, OverflowError):
            raise SpawnError(f"user {name!r} does not exist on this node") from None
        if entry.pw_uid == 0 and not self.allow_root:
            raise SpawnError(
                f"user {name!r} is uid 0, and this daemon's agents.allow_root is false"
            )
        groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
        return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir)

    def _working_dir(self, spec: AgentSpec) -> str:
        cwd = spec.working_dir or self._default_working_dir
        if not os.path.isdir(cwd):
            raise SpawnError(f"working directory {cwd} does not exist or is not a directory")
        return cwd

    def _track_spawned(
        self,
        agent_id: AgentId,
        pid: int,
        argv: tuple[str, ...],
        loop: asyncio.AbstractEventLoop,
        *,
        start_ticks: int | None,
    ) -> ProcessHandle:
        if start_ticks is None:
            # The child is unreaped, so its /proc entry exists even if it already exited.
            start_ticks = procfs.read_start_ticks(pid) or 0
        handle = ProcessHandle(agent_id, pid, start_ticks, argv)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            raise SpawnError(f"cannot watch the new process (pidfd_open: {error})") from None
        self._track(handle, pidfd, spawned=True, leads_group=True, loop=loop)
        return handle

    def _track(
        self,
        handle: ProcessHandle,
        pidfd: int,
        *,
        spawned: bool,
        leads_group: bool,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        entry = _Tracked(handle, pidfd, spawned, leads_group, loop.create_future())
        self._tracked[handle.pid] = entry
        loop.add_reader(pidfd, self._on_exit_ready, entry)

    # -- exits

    def _on_exit_ready(self, entry: _Tracked) -> None:
        if self._tracked.get(entry.handle.pid) is not entry:
            return
        info = self._collect_exit(entry)
        if info is None:
            # Readable but not yet waitable: look again shortly instead of spinning.
            loop = asyncio.get_running_loop()
            loop.remove_reader(entry.pidfd)
            loop.call_later(_SPURIOUS_RETRY_S, self._rearm, entry)
            return
        self._untrack(entry)
        if not entry.done.done():
            entry.done.set_result(info)
        self._notify(entry.handle, info)

    def _rearm(self, entry: _Tracked) -> None:
        if self._tracked.get(entry.handle.pid) is entry and self._loop is not None:
            self._loop.add_reader(entry.pidfd, self._on_exit_ready, entry)

    def _collect_exit(self, entry: _Tracked) -> ExitInfo | None:
        now = self._clock.monotonic()
        try:
            result = os.waitid(os.P_PIDFD, entry.pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            return ExitInfo(code=None, signal=None, at_s=now)  # not our child: status unknown
        if result is None:
            return None
        if result.si_code == os.CLD_EXITED:
            info = ExitInfo(code=result.si_status, signal=None, at_s=now)
        else:
            info = ExitInfo(code=None, signal=result.si_status, at_s=now)
        if info.succeeded or not self._failure_output or not entry.spawned:
            return info
        return replace(info, output=self.logs.last_line(entry.handle.agent_id))

    def _untrack(self, entry: _Tracked) -> None:
        self._tracked.pop(entry.handle.pid, None)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(entry.pidfd)
        os.close(entry.pidfd)

    def _notify(self, handle: ProcessHandle, info: ExitInfo) -> None:
        if self._callback is None:
            _log.warning("pid %d %s; nobody listens", handle.pid, info.describe())
            return
        try:
            self._callback(handle, info)
        except Exception:
            _log.exception("the exit callback failed", extra={"agent_id": handle.agent_id})

    # -- stopping

    async def _stop(self, entry: _Tracked, grace_s: float) -> None:
        victims: dict[int, int] = {}
        try:
            self._open_victims(entry.handle, victims)
            self._signal(entry, victims, signal.SIGTERM)
            if await self._wait_gone(entry, victims, timeout_s=grace_s) or self._closed:
                return
            self._open_victims(entry.handle, victims)
            self._signal(entry, victims, signal.SIGKILL)
            if not await self._wait_gone(entry, victims, timeout_s=self._kill_wait_s):
                _log.warning(
                    "pid %d or a descendant outlived SIGKILL by %.1f s",
                    entry.handle.pid,
                    self._kill_wait_s,
                    extra={"agent_id": entry.handle.agent_id},
                )
        finally:
            for pidfd in victims.values():
                os.close(pidfd)

    def _process_table(self) -> list[procfs.ProcStat]:
        """/proc as read once in this pass of the loop (forgotten at the next pass)."""
        if self._table is None:
            self._table = procfs.scan()
            loop = self._loop or asyncio.get_running_loop()
            loop.call_soon(self._forget_table)
        return self._table

    def _forget_table(self) -> None:
        self._table = None

    def _victim_stats(self, handle: ProcessHandle) -> list[procfs.ProcStat]:
        table = self._process_table()
        found = {stat.pid: stat for stat in procfs.descendants(handle.pid, table)}
        me = os.getpid()
        for stat in table:
            if stat.sid == handle.pid or (
                stat.ppid == me
                and not _REAPER.is_tracked(stat.pid)
                and procfs.read_environ_value(stat.pid, AGENT_ID_ENV) == handle.agent_id
            ):
                found[stat.pid] = stat
                found.update((below.pid, below) for below in procfs.descendants(stat.pid, table))
        return [
            stat
            for stat in found.values()
            if not stat.zombie
            and stat.pid not in (handle.pid, me)
            and not _REAPER.is_tracked(stat.pid)
        ]

    def _open_victims(self, handle: ProcessHandle, victims: dict[int, int]) -> None:
        for stat in self._victim_stats(handle):
            if stat.pid in victims or len(victims) >= _MAX_VICTIMS:
                continue
            try:
                pidfd = os.pidfd_open(stat.pid)
            except OSError:
                continue
            if procfs.read_start_ticks(stat.pid) != stat.start_ticks:
                os.close(pidfd)  # the pid was recycled between the scan and the open
                continue
            victims[stat.pid] = pidfd

    def _signal(self, entry: _Tracked, victims: Mapping[int, int], signum: int) -> None:
        # While the main process is unreaped its pid cannot be recycled, so the group
        # id is still the agent's; after that, only pidfds are safe to signal.
        if self._tracked.get(entry.handle.pid) is entry:
            _pidfd_signal(entry.pidfd, signum)
            if entry.leads_group:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(entry.handle.pid, signum)
        for pidfd in victims.values():
            _pidfd_signal(pidfd, signum)

    async def _wait_gone(
        self, entry: _Tracked, victims: Mapping[int, int], *, timeout_s: float
    ) -> bool:
        loop = asyncio.get_running_loop()
        waits: list[asyncio.Future[Any]] = []
        if not entry.done.done():
            waits.append(entry.done)
        for pidfd in victims.values():
            future: asyncio.Future[None] = loop.create_future()
            loop.add_reader(pidfd, _resolve_once, loop, pidfd, future)
            waits.append(future)
        if not waits:
            return True
        try:
            _, pending = await asyncio.wait(waits, timeout=timeout_s)
        finally:
            for pidfd in victims.values():
                loop.remove_reader(pidfd)
        return not pending


def _resolve_once(
    loop: asyncio.AbstractEventLoop, pidfd: int, future: asyncio.Future[None]
) -> None:
    loop.remove_reader(pidfd)
    if not future.done():
        future.set_result(None)


def _pidfd_signal(pidfd: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        signal.pidfd_send_signal(pidfd, signum)


def _environment(spec: AgentSpec, extra: Mapping[str, str], user: RunAs | None) -> dict[str, str]:
    base = {"PATH": os.environ.get("PATH", os.defpath), "HOME": _home(user)}
    if "LANG" in os.environ:
        base["LANG"] = os.environ["LANG"]
    if user is not None:
        base["USER"] = base["LOGNAME"] = user.name
    merged = {**base, **spec.env, **extra}
    merged[AGENT_ID_ENV] = spec.id
    return merged


def _home(user: RunAs | None) -> str:
    if user is not None:
        return user.home
    if "HOME" in os.environ:
        return os.environ["HOME"]
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return "/"


def _hand_over_config(environ: dict[str, str], user: RunAs) -> int | None:
    """An open descriptor on the config file named in ``environ``, for an agent that
    runs as ``user``; ``environ`` then names it as /proc/self/fd/N.

    The file sits in the daemon's private state directory, which another user cannot
    enter. The agent gets the file itself, made its own (mode 0400), as an inherited
    descriptor: opening /proc/self/fd/N checks only the file's own permissions.
    """
    path = environ.get(AGENT_CONFIG_FILE_ENV)
    if not path:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as error:
        raise SpawnError(f"cannot open the config file {path}: {error.strerror}") from None
    try:
        os.fchown(fd, user.uid, user.gid)
        os.fchmod(fd, 0o400)
    except OSError as error:
        os.close(fd)
        raise SpawnError(
            f"cannot give the config file {path} to user {user.name}: {error.strerror}"
        ) from None
    environ[AGENT_CONFIG_FILE_ENV] = f"/proc/self/fd/{fd}"
    return fd


def spawn_process(
    argv: tuple[str, ...],
    *,
    cwd: str,
    env: Mapping[str, str],
    user: RunAs | None,
    log_fd: int,
    pass_fds: Sequence[int] = (),
) -> int:
    """Start ``argv`` in a session of its own with output to ``log_fd``; its pid.

    ``pass_fds`` stay open in the agent under the same numbers. The caller reaps it
    (by pid). Raises ``SpawnError`` saying why it could not start.
    """
    switch = user is not None and not user.is_self
    try:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            cwd=cwd,
            env=env,
            close_fds=True,
            pass_fds=pass_fds,
            start_new_session=True,
            user=user.uid if switch and user else None,
            group=user.gid if switch and user else None,
            extra_groups=list(user.groups) if switch and user else None,
        )
    except FileNotFoundError as error:
        if error.filename == cwd:
            raise SpawnError(f"working directory {cwd} does not exist") from None
        raise SpawnError(f"program {argv[0]} not found") from None
    except PermissionError as error:
        who = f" as user {user.name}" if switch and user else ""
        raise SpawnError(f"permission denied starting {argv[0]}{who}: {error.strerror}") from None
    except (OSError, ValueError, subprocess.SubprocessError) as error:
        raise SpawnError(f"cannot start {argv[0]}: {error}") from None
    # Disown: the pidfd reader reaps this child. A Popen left with returncode None
    # would warn in __del__ and queue the pid for its own waitpid, stealing the status.
    process.returncode = 0
    return process.pid


def _reap_pid(pid: int) -> int:
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return 0
    return 1 if reaped == pid else 0


def _set_subreaper(enabled: bool) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ok = libc.prctl(_PR_SET_CHILD_SUBREAPER, int(enabled), 0, 0, 0) == 0
    except (OSError, AttributeError):
        ok = False
    if not ok:
        _log.warning("could not become a child subreaper; orphans of agents go to init")
    return bool(ok)


def _watch_sigchld(loop: asyncio.AbstractEventLoop, reap: Callable[[], int]) -> None:
    try:
        loop.add_signal_handler(signal.SIGCHLD, reap)
    except (RuntimeError, ValueError, NotImplementedError) as error:
        _log.warning("no SIGCHLD handler (%s); orphans are reaped only on demand", error)


# --------------------------------------------------------------------------- fake


@dataclass(frozen=True, slots=True)
class FakeStart:
    """One ``start`` a ``FakeSupervisor`` was asked for."""

    spec: AgentSpec
    env: Mapping[str, str]
    handle: ProcessHandle


class FakeSupervisor:
    """An in-memory supervisor: records calls, lets a test end processes.

    ``start`` hands out increasing fake pids (or raises the ``SpawnError`` queued in
    ``spawn_errors`` for that agent); ``stop`` ends the process at once with SIGTERM
    (SIGKILL for agents in ``ignore_sigterm``) and calls the exit callback before it
    returns, as the real one does; ``exit`` ends one as if it crashed.
    """

    def __init__(self, *, clock: Clock | None = None, first_pid: int = 10_000) -> None:
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._next_pid = first_pid
        self._callback: ExitCallback | None = None
        self.running: dict[int, ProcessHandle] = {}
        self.starts: list[FakeStart] = []
        self.stops: list[tuple[ProcessHandle, float]] = []
        self.adopted: list[ProcessHandle] = []
        self.spawn_errors: dict[AgentId, str] = {}
        self.ignore_sigterm: set[AgentId] = set()
        self.children: dict[int, list[int]] = {}
        self.survivors: dict[int, ProcessHandle] = {}
        """Processes a previous daemon left running, which ``adopt`` can find."""
        self.closed = False

    def set_exit_callback(self, callback: ExitCallback) -> None:
        self._callback = callback

    async def start(self, spec: AgentSpec, *, env: Mapping[str, str]) -> ProcessHandle:
        message = self.spawn_errors.get(spec.id)
        if message is not None:
            raise SpawnError(message)
        pid = self._next_pid
        self._next_pid += 1
        handle = ProcessHandle(spec.id, pid, start_ticks=pid * 10, cmdline=tuple(spec.command))
        self.running[pid] = handle
        self.starts.append(FakeStart(spec, dict(env), handle))
        return handle

    async def stop(self, handle: ProcessHandle, *, grace_s: float) -> None:
        self.stops.append((handle, grace_s))
        if self.running.get(handle.pid) != handle:
            return
        signum = signal.SIGKILL if handle.agent_id in self.ignore_sigterm else signal.SIGTERM
        self.exit(handle, signal=signum)

    def adopt(
        self, agent_id: AgentId, *, pid: int, start_ticks: int, cmdline: Sequence[str]
    ) -> ProcessHandle | None:
        if pid in self.running and self.running[pid].agent_id == agent_id:
            return self.running[pid]
        survivor = self.survivors.get(pid)
        if (
            survivor is None
            or survivor.start_ticks != start_ticks
            or not procfs.cmdline_matches(cmdline, survivor.cmdline)
        ):
            return None
        handle = ProcessHandle(agent_id, pid, start_ticks, tuple(cmdline))
        del self.survivors[pid]
        self.running[pid] = handle
        self.adopted.append(handle)
        return handle

    def descendants(self, handle: ProcessHandle) -> list[int]:
        return list(self.children.get(handle.pid, ()))

    async def close(self) -> None:
        self.closed = True

    def add_survivor(
        self, agent_id: AgentId, *, pid: int, start_ticks: int, cmdline: Sequence[str]
    ) -> None:
        """Pretend a process outlived the previous daemon (for ``adopt``)."""
        self.survivors[pid] = ProcessHandle(agent_id, pid, start_ticks, tuple(cmdline))

    def handle_of(self, agent_id: AgentId) -> ProcessHandle | None:
        """The running handle of ``agent_id``, if any."""
        return next((h for h in self.running.values() if h.agent_id == agent_id), None)

    def exit(
        self, target: ProcessHandle | AgentId, *, code: int | None = None, signal: int | None = None
    ) -> ExitInfo:
        """End a running process and call the exit callback; return what it was told."""
        handle = target if isinstance(target, ProcessHandle) else self.handle_of(target)
        if handle is None or self.running.get(handle.pid) != handle:
            raise KeyError(f"{target!r} is not running")
        del self.running[handle.pid]
        info = ExitInfo(
            code=code if code is not None or signal is not None else 0,
            signal=signal,
            at_s=self._clock.monotonic(),
        )
        if self._callback is not None:
            self._callback(handle, info)
        return info


if TYPE_CHECKING:

    def _both_are_supervisors(
        real: ProcessSupervisor, fake: FakeSupervisor
    ) -> tuple[Supervisor, Supervisor]:
        return real, fake
