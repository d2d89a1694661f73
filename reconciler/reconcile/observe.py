"""Facts in, new records out: what a start, an exit, a heartbeat or an operation means.

Each function takes the current ``AgentRecord`` and a fact and returns the next
record, changing phases only through ``reconciler.model.status.transition``. They are
pure like ``decide.reconcile``; the controller calls them and stores the result.
The executor applies ``decide`` actions with ``apply_action``.
"""

from __future__ import annotations

from dataclasses import replace

from reconciler.model.heartbeat import Heartbeat
from reconciler.model.spec import AgentSpec, DesiredState, RestartPolicy
from reconciler.model.status import (
    AgentRecord,
    Backoff,
    ExitInfo,
    Phase,
    StopRequest,
    transition,
)
from reconciler.reconcile.decide import EnterBackoff, ResetFailures, SetPhase, Stop
from reconciler.reconcile.policy import Policy

__all__ = [
    "apply_backoff",
    "apply_phase",
    "apply_reset_failures",
    "apply_stop_requested",
    "on_exit",
    "on_heartbeat",
    "on_restart_requested",
    "on_sample",
    "on_started",
]


def on_started(
    record: AgentRecord,
    spec: AgentSpec,
    *,
    pid: int,
    start_ticks: int | None,
    now: float,
    policy: Policy,
) -> AgentRecord:
    """A process for ``spec`` now runs as ``pid``."""
    starts = (*_within(record.recent_starts_s, now - policy.burst_window_s), now)
    phase = Phase.STARTING if spec.heartbeat is not None else Phase.RUNNING
    return transition(
        record,
        phase,
        pid=pid,
        process_start_ticks=start_ticks,
        started_at_s=now,
        running_fingerprint=spec.fingerprint(),
        stop_grace_s=spec.stop_grace_period_s,
        restart_count=record.restart_count + (1 if record.last_exit is not None else 0),
        recent_starts_s=starts,
        backoff=None,
        stop=None,
        restart_requested=False,
        finished_fingerprint="",
        healthy_since_s=now if phase is Phase.RUNNING else None,
        last_heartbeat_s=None,
        reported_status=None,
    )


def on_exit(
    record: AgentRecord,
    exit_info: ExitInfo,
    *,
    spec: AgentSpec | None,
    now: float,
    policy: Policy,
) -> AgentRecord:
    """The agent's process ended (or never started: ``exit_info.spawn_error``)."""
    gone = {
        "pid": None,
        "process_start_ticks": None,
        "last_exit": exit_info,
        "stop": None,
        "healthy_since_s": None,
        "cpu_percent": 0.0,
        "memory_bytes": 0,
    }
    stop = record.stop
    if stop is not None and not stop.failure:
        return transition(record, Phase.STOPPED, message=f"stopped: {stop.reason}", **gone)
    what = stop.reason if stop is not None else exit_info.describe()
    if spec is None or spec.state is DesiredState.STOPPED:
        return transition(record, Phase.STOPPED, message=what, **gone)
    failures = record.consecutive_failures + 1
    if _ends_for_good(spec.restart_policy, exit_info):
        phase = Phase.STOPPED if exit_info.succeeded else Phase.FAILED
        return transition(
            record,
            phase,
            message=f"{what}; restartPolicy {spec.restart_policy}",
            consecutive_failures=failures,
            finished_fingerprint=spec.fingerprint(),
            **gone,
        )
    delay = policy.crash_delay_s(failures)
    backoff = Backoff(next_attempt_s=now + delay, delay_s=delay, reason=what)
    return transition(
        record,
        Phase.BACKOFF,
        message=what,
        consecutive_failures=failures,
        backoff=backoff,
        **gone,
    )


def on_heartbeat(
    record: AgentRecord, heartbeat: Heartbeat, *, now: float, wall_now: float
) -> AgentRecord:
    """A validated heartbeat arrived at ``now`` (monotonic) / ``wall_now`` (wall clock)."""
    return replace(
        record,
        last_heartbeat_s=now,
        heartbeat_skew_s=wall_now - heartbeat.timestamp,
        reported_status=heartbeat.status,
        reported_version=heartbeat.version,
        cpu_percent=heartbeat.cpu_percent,
        memory_bytes=heartbeat.memory_bytes,
    )


def on_sample(record: AgentRecord, *, cpu_percent: float, memory_bytes: int) -> AgentRecord:
    """A resource sample of the agent's process tree."""
    return replace(record, cpu_percent=cpu_percent, memory_bytes=memory_bytes)


def on_restart_requested(record: AgentRecord) -> AgentRecord:
    """An operator asked for a restart: once, now, clearing any backoff."""
    changes: dict[str, object] = {
        "restart_requested": True,
        "backoff": None,
        "consecutive_failures": 0,
        "recent_starts_s": (),
        "finished_fingerprint": "",
    }
    if record.phase in (Phase.BACKOFF, Phase.FAILED):
        return transition(record, Phase.PENDING, message="restart requested", **changes)
    return replace(record, **changes)  # type: ignore[arg-type]


def apply_phase(record: AgentRecord, action: SetPhase, *, now: float) -> AgentRecord:
    """Apply ``SetPhase``; entering Running starts the healthy clock."""
    healthy_since = record.healthy_since_s
    if action.phase is Phase.RUNNING and record.phase is not Phase.RUNNING:
        healthy_since = now
    elif action.phase is not Phase.RUNNING:
        healthy_since = None
    return transition(record, action.phase, message=action.message, healthy_since_s=healthy_since)


def apply_backoff(record: AgentRecord, action: EnterBackoff) -> AgentRecord:
    """Apply ``EnterBackoff``."""
    return transition(record, Phase.BACKOFF, message=action.backoff.reason, backoff=action.backoff)


def apply_reset_failures(record: AgentRecord, _action: ResetFailures) -> AgentRecord:
    """Apply ``ResetFailures``."""
    return replace(record, consecutive_failures=0)


def apply_stop_requested(record: AgentRecord, action: Stop, *, now: float) -> AgentRecord:
    """The executor has sent SIGTERM for ``action``."""
    request = StopRequest(reason=action.reason, requested_at_s=now, failure=action.failure)
    return transition(record, Phase.STOPPING, message=action.reason, stop=request)


def _ends_for_good(policy: RestartPolicy, exit_info: ExitInfo) -> bool:
    if policy is RestartPolicy.NEVER:
        return True
    return policy is RestartPolicy.ON_FAILURE and exit_info.succeeded


def _within(times: tuple[float, ...], since: float) -> tuple[float, ...]:
    return tuple(t for t in times if t > since)
