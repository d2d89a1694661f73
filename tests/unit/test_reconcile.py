"""The control loop's rules, stated as tables over the pure reconcile function."""

from __future__ import annotations

from dataclasses import replace

import pytest

from reconciler.model import (
    AgentId,
    AgentRecord,
    AgentSpec,
    DesiredState,
    ExitInfo,
    Heartbeat,
    HeartbeatSpec,
    Phase,
    ReportedStatus,
    RestartPolicy,
)
from reconciler.model.status import Backoff, StopRequest
from reconciler.reconcile import (
    EnterBackoff,
    Forget,
    Policy,
    ResetFailures,
    SetPhase,
    Start,
    Stop,
    reconcile,
)
from reconciler.reconcile.observe import (
    apply_phase,
    apply_stop_requested,
    on_exit,
    on_heartbeat,
    on_restart_requested,
    on_started,
)

POLICY = Policy()
NOW = 1000.0
ID = AgentId("shipper")


def spec(**changes: object) -> AgentSpec:
    base = AgentSpec(id=ID, command=("/bin/sleep", "1000"))
    return replace(base, **changes)  # type: ignore[arg-type]


def running(s: AgentSpec, *, at: float = NOW - 100) -> AgentRecord:
    return on_started(AgentRecord(agent_id=ID), s, pid=42, start_ticks=7, now=at, policy=POLICY)


def crashed(s: AgentSpec, times: int, *, at: float = NOW) -> AgentRecord:
    record = AgentRecord(agent_id=ID)
    for _ in range(times):
        record = on_started(record, s, pid=42, start_ticks=7, now=at, policy=POLICY)
        record = on_exit(record, ExitInfo(1, None, at), spec=s, now=at, policy=POLICY)
    return record


def test_a_desired_agent_that_never_ran_is_started() -> None:
    decision = reconcile(spec(), AgentRecord(agent_id=ID), NOW, POLICY)
    assert decision.actions == (Start(spec(), "not running"),)


def test_an_agent_no_longer_desired_is_stopped_then_forgotten() -> None:
    record = running(spec())
    assert reconcile(None, record, NOW, POLICY).actions == (
        Stop(10.0, "removed from the desired state"),
    )
    stopping = apply_stop_requested(record, Stop(10.0, "removed"), now=NOW)
    assert reconcile(None, stopping, NOW, POLICY).actions == ()
    gone = on_exit(stopping, ExitInfo(None, 15, NOW), spec=None, now=NOW, policy=POLICY)
    assert reconcile(None, gone, NOW, POLICY).actions == (Forget(),)


def test_an_agent_desired_stopped_is_stopped_and_never_started() -> None:
    stopped = spec(state=DesiredState.STOPPED)
    assert reconcile(stopped, running(spec()), NOW, POLICY).actions == (
        Stop(10.0, "desired state is stopped"),
    )
    fresh = reconcile(stopped, AgentRecord(agent_id=ID), NOW, POLICY)
    assert fresh.actions == (SetPhase(Phase.STOPPED, "desired state is stopped"),)
    assert not any(isinstance(a, Start) for a in fresh.actions)


def test_a_healthy_agent_without_heartbeats_needs_nothing() -> None:
    decision = reconcile(spec(), running(spec()), NOW, POLICY)
    assert decision.actions == ()


def test_a_changed_spec_restarts_the_agent_but_a_label_change_does_not() -> None:
    record = running(spec())
    assert reconcile(spec(version="2"), record, NOW, POLICY).actions == (
        Stop(10.0, "spec changed"),
    )
    assert reconcile(spec(labels={"team": "obs"}), record, NOW, POLICY).actions == ()


def test_an_intentional_stop_for_a_spec_change_starts_again_without_backoff() -> None:
    record = apply_stop_requested(running(spec()), Stop(10.0, "spec changed"), now=NOW)
    record = on_exit(record, ExitInfo(None, 15, NOW), spec=spec(), now=NOW, policy=POLICY)
    assert record.phase is Phase.STOPPED
    assert record.backoff is None
    assert isinstance(reconcile(spec(version="2"), record, NOW, POLICY).actions[0], Start)


@pytest.mark.parametrize(
    ("crashes", "delay_s"),
    [
        pytest.param(1, 0.0, id="first-restart-is-immediate"),
        pytest.param(2, 1.0, id="then-one-second"),
        pytest.param(3, 2.0, id="doubling"),
        pytest.param(5, 8.0, id="doubling-again"),
        pytest.param(30, 60.0, id="capped-at-sixty-seconds"),
    ],
)
def test_a_crash_loop_backs_off(crashes: int, delay_s: float) -> None:
    record = crashed(spec(), crashes)
    assert record.phase is Phase.BACKOFF
    assert record.backoff is not None
    assert record.backoff.delay_s == delay_s
    assert record.backoff.reason == "exited with code 1"


def test_backoff_holds_the_start_until_the_next_attempt() -> None:
    record = crashed(spec(), 3)
    early = reconcile(spec(), record, NOW + 1.0, Policy(burst_starts=100))
    assert early.actions == ()
    assert early.requeue_after_s == pytest.approx(1.0)
    due = reconcile(spec(), record, NOW + 2.0, Policy(burst_starts=100))
    assert isinstance(due.actions[0], Start)


def test_too_many_starts_in_the_burst_window_enter_backoff() -> None:
    policy = Policy(burst_starts=5, burst_window_s=10.0)
    record = AgentRecord(agent_id=ID)
    for i in range(5):
        record = on_started(record, spec(), pid=42, start_ticks=1, now=NOW + i, policy=policy)
        stop = Stop(1.0, "restart requested")
        record = apply_stop_requested(record, stop, now=NOW + i)
        record = on_exit(
            record, ExitInfo(0, None, NOW + i), spec=spec(), now=NOW + i, policy=policy
        )
    decision = reconcile(spec(), record, NOW + 5, policy)
    assert len(decision.actions) == 1
    action = decision.actions[0]
    assert isinstance(action, EnterBackoff)
    assert action.backoff.next_attempt_s == NOW + 10.0
    assert "5 starts within 10s" in action.backoff.reason


@pytest.mark.parametrize(
    ("policy", "exit_info", "phase"),
    [
        pytest.param(RestartPolicy.ALWAYS, ExitInfo(0, None, NOW), Phase.BACKOFF, id="always-0"),
        pytest.param(RestartPolicy.ALWAYS, ExitInfo(1, None, NOW), Phase.BACKOFF, id="always-1"),
        pytest.param(
            RestartPolicy.ON_FAILURE, ExitInfo(0, None, NOW), Phase.STOPPED, id="onfailure-0"
        ),
        pytest.param(
            RestartPolicy.ON_FAILURE, ExitInfo(None, 9, NOW), Phase.BACKOFF, id="onfailure-kill"
        ),
        pytest.param(RestartPolicy.NEVER, ExitInfo(0, None, NOW), Phase.STOPPED, id="never-0"),
        pytest.param(RestartPolicy.NEVER, ExitInfo(2, None, NOW), Phase.FAILED, id="never-2"),
    ],
)
def test_the_restart_policy_decides_what_an_exit_means(
    policy: RestartPolicy, exit_info: ExitInfo, phase: Phase
) -> None:
    s = spec(restart_policy=policy)
    record = on_exit(running(s), exit_info, spec=s, now=NOW, policy=POLICY)
    assert record.phase is phase
    starts = [a for a in reconcile(s, record, NOW + 120, POLICY).actions if isinstance(a, Start)]
    assert bool(starts) == (phase is Phase.BACKOFF)


def test_an_agent_that_ended_for_good_starts_again_when_its_spec_changes() -> None:
    s = spec(restart_policy=RestartPolicy.NEVER)
    record = on_exit(running(s), ExitInfo(2, None, NOW), spec=s, now=NOW, policy=POLICY)
    assert reconcile(s, record, NOW, POLICY).actions == ()
    changed = replace(s, version="2")
    assert isinstance(reconcile(changed, record, NOW, POLICY).actions[0], Start)


def test_restart_clears_backoff_and_starts_at_once() -> None:
    record = on_restart_requested(crashed(spec(), 6))
    assert record.phase is Phase.PENDING
    assert record.backoff is None
    assert reconcile(spec(), record, NOW, POLICY).actions == (Start(spec(), "restart requested"),)


def test_restart_of_a_running_agent_stops_it_first() -> None:
    record = on_restart_requested(running(spec()))
    assert reconcile(spec(), record, NOW, POLICY).actions == (Stop(10.0, "restart requested"),)


def test_a_healthy_period_resets_the_crash_count() -> None:
    record = on_started(crashed(spec(), 4), spec(), pid=9, start_ticks=1, now=NOW, policy=POLICY)
    soon = reconcile(spec(), record, NOW + 10, POLICY)
    assert soon.actions == ()
    assert soon.requeue_after_s == pytest.approx(590.0)
    later = reconcile(spec(), record, NOW + 600, POLICY)
    assert later.actions == (ResetFailures(),)


HB = HeartbeatSpec(interval_s=1.0, timeout_s=3.0)


def beat(
    record: AgentRecord, at: float, status: ReportedStatus = ReportedStatus.HEALTHY
) -> AgentRecord:
    hb = Heartbeat(ID, 42, 1.7e9, "1.0", status, 1.0, 1024)
    return on_heartbeat(record, hb, now=at, wall_now=1.7e9)


def test_a_heartbeating_agent_is_starting_until_its_first_heartbeat() -> None:
    s = spec(heartbeat=HB)
    record = running(s, at=NOW)
    assert record.phase is Phase.STARTING
    waiting = reconcile(s, record, NOW + 1, POLICY)
    assert waiting.actions == ()
    assert waiting.requeue_after_s == pytest.approx(2.0)
    healthy = reconcile(s, beat(record, NOW + 1), NOW + 1, POLICY)
    assert healthy.actions == (SetPhase(Phase.RUNNING),)


def test_a_missed_interval_degrades_and_the_timeout_restarts() -> None:
    s = spec(heartbeat=HB)
    record = apply_phase(beat(running(s, at=NOW), NOW), SetPhase(Phase.RUNNING), now=NOW)
    assert reconcile(s, record, NOW + 1.2, POLICY).actions == ()
    late = reconcile(s, record, NOW + 1.6, POLICY)
    assert late.actions == (SetPhase(Phase.DEGRADED, "heartbeat late: last one 1.6s ago"),)
    hung = reconcile(s, record, NOW + 3.0, POLICY)
    assert hung.actions == (Stop(10.0, "no heartbeat for 3.0s (timeout 3s)", failure=True),)


def test_a_hung_agent_stopped_for_it_counts_as_a_crash() -> None:
    s = spec(heartbeat=HB)
    record = running(s, at=NOW)
    record = apply_stop_requested(record, Stop(10.0, "no heartbeat", failure=True), now=NOW)
    record = on_exit(record, ExitInfo(None, 15, NOW), spec=s, now=NOW, policy=POLICY)
    assert record.phase is Phase.BACKOFF
    assert record.consecutive_failures == 1


def test_an_agent_recovers_from_degraded_when_heartbeats_return() -> None:
    s = spec(heartbeat=HB)
    record = apply_phase(running(s, at=NOW), SetPhase(Phase.DEGRADED, "late"), now=NOW)
    record = beat(record, NOW + 2)
    assert reconcile(s, record, NOW + 2, POLICY).actions == (SetPhase(Phase.RUNNING),)


@pytest.mark.parametrize(
    "status", [ReportedStatus.DEGRADED, ReportedStatus.UNHEALTHY], ids=["degraded", "unhealthy"]
)
def test_an_agent_that_says_it_is_unwell_is_shown_degraded(status: ReportedStatus) -> None:
    s = spec(heartbeat=HB)
    record = beat(running(s, at=NOW), NOW, status)
    assert reconcile(s, record, NOW, POLICY).actions == (
        SetPhase(Phase.DEGRADED, f"agent reports {status}"),
    )


def test_reconcile_is_idempotent_for_the_same_inputs() -> None:
    record = crashed(spec(), 3)
    first = reconcile(spec(), record, NOW + 0.5, POLICY)
    assert first == reconcile(spec(), record, NOW + 0.5, POLICY)


def test_a_stopping_agent_is_left_alone_until_it_exits() -> None:
    record = replace(
        running(spec()),
        phase=Phase.STOPPING,
        stop=StopRequest("desired state is stopped", NOW),
    )
    assert reconcile(spec(), record, NOW, POLICY).actions == ()


def test_an_expired_backoff_is_shown_until_the_start() -> None:
    record = replace(crashed(spec(), 1), backoff=Backoff(NOW + 5, 5, "exited with code 1"))
    decision = reconcile(spec(), record, NOW, POLICY)
    assert decision.actions == ()
    assert decision.requeue_after_s == pytest.approx(5.0)
