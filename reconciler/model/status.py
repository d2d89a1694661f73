"""What is running: the observed state of one agent, and its phases.

``AgentRecord`` is a frozen value. The daemon's controller is its one writer: it
replaces records whole, and every phase change goes through ``transition``, which
checks the change against ``ALLOWED``. Times are seconds on the daemon's monotonic
clock (``*_s``); the gRPC edge converts them to wall-clock timestamps.

Read next: ``reconciler.reconcile.decide`` decides what to do with a record.
"""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass, replace

from reconciler.model.heartbeat import ReportedStatus
from reconciler.model.ids import AgentId

__all__ = [
    "ALLOWED",
    "AgentRecord",
    "Backoff",
    "ExitInfo",
    "IllegalTransition",
    "Override",
    "Phase",
    "StopRequest",
    "transition",
]


class Phase(enum.StrEnum):
    """Where an agent is in its life. Listed once; changed only by ``transition``."""

    PENDING = "Pending"
    """Known and desired running, not started yet."""
    STARTING = "Starting"
    """Spawned; waiting for the first heartbeat (agents with a heartbeat section)."""
    RUNNING = "Running"
    """Alive and healthy."""
    DEGRADED = "Degraded"
    """Alive, but a heartbeat is late or the agent says it is not healthy."""
    BACKOFF = "Backoff"
    """Not running; waiting before the next start after crashes."""
    STOPPING = "Stopping"
    """Asked to stop; waiting for the process group to exit."""
    STOPPED = "Stopped"
    """Not running, and not meant to be (or it completed)."""
    FAILED = "Failed"
    """Exited and its restart policy says not to start it again."""


_ALIVE = frozenset({Phase.STARTING, Phase.RUNNING, Phase.DEGRADED, Phase.STOPPING})
_ALL = frozenset(Phase)

#: Which phase may follow which. A phase may always be re-entered (to update its
#: message or backoff), which ``transition`` allows without listing it here.
ALLOWED: dict[Phase, frozenset[Phase]] = {
    # PENDING -> started, or held back, or not wanted after all
    Phase.PENDING: frozenset(
        {Phase.STARTING, Phase.RUNNING, Phase.BACKOFF, Phase.STOPPED, Phase.FAILED}
    ),
    # STARTING -> first heartbeat, late heartbeat, asked to stop, or exited
    Phase.STARTING: frozenset(
        {Phase.RUNNING, Phase.DEGRADED, Phase.STOPPING, Phase.BACKOFF, Phase.STOPPED, Phase.FAILED}
    ),
    # RUNNING -> unhealthy, asked to stop, or exited
    Phase.RUNNING: frozenset(
        {Phase.DEGRADED, Phase.STOPPING, Phase.BACKOFF, Phase.STOPPED, Phase.FAILED}
    ),
    # DEGRADED -> healthy again, asked to stop, or exited
    Phase.DEGRADED: frozenset(
        {Phase.RUNNING, Phase.STOPPING, Phase.BACKOFF, Phase.STOPPED, Phase.FAILED}
    ),
    # BACKOFF -> started again, or no longer wanted
    Phase.BACKOFF: frozenset(
        {Phase.PENDING, Phase.STARTING, Phase.RUNNING, Phase.STOPPED, Phase.FAILED}
    ),
    # STOPPING -> exited: wanted (STOPPED) or as a failure (BACKOFF, FAILED)
    Phase.STOPPING: frozenset({Phase.STOPPED, Phase.BACKOFF, Phase.FAILED}),
    # STOPPED -> started again, or held back by the burst guard
    Phase.STOPPED: frozenset({Phase.PENDING, Phase.STARTING, Phase.RUNNING, Phase.BACKOFF}),
    # FAILED -> started again after a restart or a new spec, or no longer wanted
    Phase.FAILED: frozenset(
        {Phase.PENDING, Phase.STARTING, Phase.RUNNING, Phase.BACKOFF, Phase.STOPPED}
    ),
}
assert set(ALLOWED) == _ALL


class Override(enum.StrEnum):
    """A local operator's start or stop, which holds until a newer generation arrives."""

    START = "start"
    STOP = "stop"


class IllegalTransition(RuntimeError):
    """A phase change ``ALLOWED`` does not list: a bug in the caller, never input."""


@dataclass(frozen=True, slots=True)
class ExitInfo:
    """How a process ended."""

    code: int | None
    """Exit status when it exited; ``None`` when a signal killed it."""
    signal: int | None
    """The signal that killed it, if one did."""
    at_s: float
    spawn_error: str = ""
    """Set when the process never ran (exec failed); ``code`` and ``signal`` are None."""
    output: str = ""
    """The last line the process printed before a failed exit, when the daemon read it
    (printable, one line); "" otherwise."""

    @property
    def succeeded(self) -> bool:
        """True for a clean exit with status 0."""
        return self.code == 0 and self.signal is None and not self.spawn_error

    def describe(self) -> str:
        """A short phrase for messages: 'exited with code 1', 'killed by SIGKILL', and
        the last line printed when known: 'exited with code 2: no such file x.yaml'."""
        if self.spawn_error:
            return f"failed to start: {self.spawn_error}"
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            how = f"killed by {name}"
        elif self.code is None:
            return "exited (status unknown: it was adopted, not spawned, by this daemon)"
        else:
            how = f"exited with code {self.code}"
        return f"{how}: {self.output}" if self.output else how


@dataclass(frozen=True, slots=True)
class Backoff:
    """Why an agent is held back and until when."""

    next_attempt_s: float
    delay_s: float
    reason: str


@dataclass(frozen=True, slots=True)
class StopRequest:
    """A stop the daemon asked for; ``failure`` counts the exit as a crash (hung agent)."""

    reason: str
    requested_at_s: float
    failure: bool = False


@dataclass(frozen=True)
class AgentRecord:
    """The observed state of one agent on this node."""

    agent_id: AgentId
    phase: Phase = Phase.PENDING
    pid: int | None = None
    process_start_ticks: int | None = None
    """The process start time in clock ticks since boot (/proc/PID/stat field 22)."""
    started_at_s: float | None = None
    running_fingerprint: str = ""
    """``AgentSpec.fingerprint()`` of the spec the live process was started with."""
    restart_count: int = 0
    consecutive_failures: int = 0
    recent_starts_s: tuple[float, ...] = ()
    last_exit: ExitInfo | None = None
    last_heartbeat_s: float | None = None
    heartbeat_skew_s: float | None = None
    reported_status: ReportedStatus | None = None
    reported_version: str = ""
    cpu_percent: float = 0.0
    memory_bytes: int = 0
    backoff: Backoff | None = None
    stop: StopRequest | None = None
    restart_requested: bool = False
    healthy_since_s: float | None = None
    stop_grace_s: float = 10.0
    """The grace period of the spec the live process was started with."""
    finished_fingerprint: str = ""
    """Set when the agent ended for good under its restart policy (completed or
    failed); it stays down until its spec changes or an operator restarts it."""
    message: str = ""

    @property
    def alive(self) -> bool:
        """True while a process for this agent exists."""
        return self.pid is not None

    def __post_init__(self) -> None:
        if self.phase in _ALIVE and self.pid is None:
            raise IllegalTransition(f"{self.agent_id}: phase {self.phase} needs a pid")


def transition(
    record: AgentRecord, to: Phase, *, message: str = "", **changes: object
) -> AgentRecord:
    """Return ``record`` in phase ``to`` with ``changes`` applied; refuse illegal moves."""
    if to != record.phase and to not in ALLOWED[record.phase]:
        raise IllegalTransition(f"{record.agent_id}: {record.phase} -> {to} is not allowed")
    return replace(record, phase=to, message=message, **changes)  # type: ignore[arg-type]
