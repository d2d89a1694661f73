"""The control loop's one decision: given what should run and what is, what to do.

``reconcile(spec, observed, now, policy)`` is pure: no I/O, no clock reads, no
randomness. It returns a ``Decision``: a few actions for the executor
(``reconciler.daemon.controller``) and when to look again. It is level-triggered: it
never sees the event that woke it, only the current record, so running it twice on
the same inputs asks for the same thing.

What it does not do: change records (``reconciler.reconcile.observe`` turns facts into
new records) or touch processes (the executor does, through the supervisor).
"""

from __future__ import annotations

from dataclasses import dataclass

from reconciler.model.heartbeat import ReportedStatus
from reconciler.model.spec import AgentSpec, DesiredState, HeartbeatSpec
from reconciler.model.status import AgentRecord, Backoff, Phase
from reconciler.reconcile.policy import Policy

__all__ = [
    "Action",
    "Decision",
    "EnterBackoff",
    "Forget",
    "ResetFailures",
    "SetPhase",
    "Start",
    "Stop",
    "reconcile",
]


@dataclass(frozen=True, slots=True)
class Start:
    """Spawn a process for ``spec``."""

    spec: AgentSpec
    reason: str


@dataclass(frozen=True, slots=True)
class Stop:
    """SIGTERM the agent's process group, SIGKILL after ``grace_s``.

    ``failure`` marks a stop of a hung agent: its exit then counts as a crash.
    """

    grace_s: float
    reason: str
    failure: bool = False


@dataclass(frozen=True, slots=True)
class SetPhase:
    """Move the record to ``phase`` (through the checked transition)."""

    phase: Phase
    message: str = ""


@dataclass(frozen=True, slots=True)
class EnterBackoff:
    """Hold the agent back until ``backoff.next_attempt_s``."""

    backoff: Backoff


@dataclass(frozen=True, slots=True)
class ResetFailures:
    """The agent has been healthy long enough: forget its crash count."""


@dataclass(frozen=True, slots=True)
class Forget:
    """The agent is gone from the desired state and stopped: drop its record."""


Action = Start | Stop | SetPhase | EnterBackoff | ResetFailures | Forget


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do now, and when to reconcile this agent again (``None``: on the next event)."""

    actions: tuple[Action, ...] = ()
    requeue_after_s: float | None = None


_NOTHING = Decision()


def reconcile(
    spec: AgentSpec | None, observed: AgentRecord, now: float, policy: Policy
) -> Decision:
    """Decide the next step for one agent. ``spec`` is None once it is no longer desired."""
    if spec is None:
        return _retire(observed)
    if spec.state is DesiredState.STOPPED:
        return _keep_stopped(spec, observed)
    if observed.alive:
        return _keep_running(spec, observed, now, policy)
    return _start_when_due(spec, observed, now, policy)


def _retire(observed: AgentRecord) -> Decision:
    if not observed.alive:
        return Decision((Forget(),))
    if observed.stop is not None:
        return _NOTHING
    return Decision((Stop(observed.stop_grace_s, "removed from the desired state"),))


def _keep_stopped(spec: AgentSpec, observed: AgentRecord) -> Decision:
    if observed.alive:
        if observed.stop is not None:
            return _NOTHING
        return Decision((Stop(spec.stop_grace_period_s, "desired state is stopped"),))
    if observed.phase is Phase.STOPPED:
        return _NOTHING
    return Decision((SetPhase(Phase.STOPPED, "desired state is stopped"),))


def _keep_running(spec: AgentSpec, observed: AgentRecord, now: float, policy: Policy) -> Decision:
    if observed.stop is not None:
        return _NOTHING  # the exit will wake us
    if observed.restart_requested:
        return Decision((Stop(observed.stop_grace_s, "restart requested"),))
    if observed.running_fingerprint != spec.fingerprint():
        return Decision((Stop(observed.stop_grace_s, "spec changed"),))
    if spec.heartbeat is None:
        return _healthy(observed, now, policy, next_check_s=None)
    return _judge_heartbeat(spec.heartbeat, observed, now, policy)


def _judge_heartbeat(
    heartbeat: HeartbeatSpec, observed: AgentRecord, now: float, policy: Policy
) -> Decision:
    last = observed.last_heartbeat_s
    since = last if last is not None else (observed.started_at_s or now)
    age = now - since
    if age >= heartbeat.timeout_s:
        reason = f"no heartbeat for {age:.1f}s (timeout {heartbeat.timeout_s:g}s)"
        return Decision((Stop(observed.stop_grace_s, reason, failure=True),))
    if last is None:
        return Decision(requeue_after_s=since + heartbeat.timeout_s - now)
    late_after = heartbeat.interval_s * (1.0 + policy.heartbeat_late_fraction)
    if age >= late_after:
        message = f"heartbeat late: last one {age:.1f}s ago"
        return _degraded(observed, message, requeue_after_s=since + heartbeat.timeout_s - now)
    if observed.reported_status in (ReportedStatus.DEGRADED, ReportedStatus.UNHEALTHY):
        message = f"agent reports {observed.reported_status}"
        return _degraded(observed, message, requeue_after_s=since + late_after - now)
    return _healthy(observed, now, policy, next_check_s=since + late_after - now)


def _degraded(observed: AgentRecord, message: str, *, requeue_after_s: float) -> Decision:
    actions: tuple[Action, ...] = ()
    if observed.phase is not Phase.DEGRADED or observed.message != message:
        actions = (SetPhase(Phase.DEGRADED, message),)
    return Decision(actions, requeue_after_s=max(requeue_after_s, 0.0))


def _healthy(
    observed: AgentRecord, now: float, policy: Policy, *, next_check_s: float | None
) -> Decision:
    actions: list[Action] = []
    if observed.phase is not Phase.RUNNING:
        actions.append(SetPhase(Phase.RUNNING))
    requeue = next_check_s
    if observed.consecutive_failures > 0:
        healthy_since = observed.healthy_since_s if observed.phase is Phase.RUNNING else now
        healthy_for = now - (healthy_since if healthy_since is not None else now)
        if healthy_for >= policy.backoff_reset_after_s:
            actions.append(ResetFailures())
        else:
            requeue = _earliest(requeue, policy.backoff_reset_after_s - healthy_for)
    return Decision(tuple(actions), requeue_after_s=requeue)


def _start_when_due(spec: AgentSpec, observed: AgentRecord, now: float, policy: Policy) -> Decision:
    if not observed.restart_requested and observed.finished_fingerprint == spec.fingerprint():
        return _NOTHING  # ended for good under its restart policy
    backoff = observed.backoff
    if backoff is not None and now < backoff.next_attempt_s and not observed.restart_requested:
        actions: tuple[Action, ...] = ()
        if observed.phase is not Phase.BACKOFF:
            actions = (EnterBackoff(backoff),)
        return Decision(actions, requeue_after_s=backoff.next_attempt_s - now)
    window_start = now - policy.burst_window_s
    recent = [t for t in observed.recent_starts_s if t > window_start]
    if len(recent) >= policy.burst_starts:
        next_attempt = min(recent) + policy.burst_window_s
        reason = f"{len(recent)} starts within {policy.burst_window_s:g}s"
        held = Backoff(next_attempt_s=next_attempt, delay_s=next_attempt - now, reason=reason)
        return Decision((EnterBackoff(held),), requeue_after_s=next_attempt - now)
    return Decision((Start(spec, _start_reason(observed)),))


def _start_reason(observed: AgentRecord) -> str:
    if observed.restart_requested:
        return "restart requested"
    if observed.last_exit is None:
        return "not running"
    if observed.backoff is not None:
        return f"restarting after backoff ({observed.backoff.reason})"
    return f"restarting: {observed.last_exit.describe()}"


def _earliest(a: float | None, b: float) -> float:
    return b if a is None else min(a, b)
