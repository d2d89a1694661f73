"""The controller's promises under any order of events (a hypothesis state machine).

The machine drives one node's Controller over fakes (``tests.unit.test_controller``'s
harness: FakeSupervisor, MemoryStore, and an event loop whose clock is the FakeClock)
through new generations, crashes, hangs, daemon restarts (killed or stopped),
operations and time passing, and checks after every step, once the work queue is
idle:

- at most one live process per agent id, and the controller tracks exactly the live
  ones (nothing a previous daemon left is forgotten);
- an agent whose effective desired state is stopped (spec or operator override) is
  never started, and every start runs the effective spec;
- after quiet time (longer than the backoff cap, the burst window and a heartbeat
  timeout) the running agents are exactly the ones desired running, minus those that
  ended for good under their restart policy; nothing is left in Backoff.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from reconciler.daemon.clock import FakeClock
from reconciler.model import (
    AgentId,
    AgentSpec,
    Conflict,
    DesiredState,
    Generation,
    HeartbeatSpec,
    InvalidArgument,
    NodeDesiredState,
    NotFound,
    Phase,
    RestartPolicy,
    StaleGeneration,
)
from reconciler.reconcile import Policy
from tests.unit.test_controller import FakeTimeLoop, Node, agent

T = TypeVar("T")

POOL = ("p0", "p1", "p2", "p3")
HEARTBEAT = HeartbeatSpec(interval_s=1.0, timeout_s=3.0)
POLICY = Policy(
    backoff_initial_s=1.0,
    backoff_max_s=4.0,
    backoff_reset_after_s=30.0,
    burst_starts=5,
    burst_window_s=10.0,
)
QUIET_S = POLICY.backoff_max_s + POLICY.burst_window_s + 2 * HEARTBEAT.timeout_s + 2.0
OPERATION_IDS = ("op-a", "op-b", "op-c")


@dataclass(frozen=True)
class Variant:
    version: str
    stopped: bool
    heartbeat: bool
    restart_policy: RestartPolicy

    def spec(self, agent_id: str) -> AgentSpec:
        return agent(
            agent_id,
            version=self.version,
            state=DesiredState.STOPPED if self.stopped else DesiredState.RUNNING,
            heartbeat=HEARTBEAT if self.heartbeat else None,
            restart_policy=self.restart_policy,
        )


variants = st.builds(
    Variant,
    version=st.sampled_from(["1", "2"]),
    stopped=st.sampled_from([False, False, False, True]),
    heartbeat=st.booleans(),
    restart_policy=st.sampled_from([RestartPolicy.ALWAYS, RestartPolicy.ON_FAILURE]),
)
desired_states = st.dictionaries(st.sampled_from(POOL), variants, max_size=len(POOL))


class ControllerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = TemporaryDirectory()
        self.clock = FakeClock()
        self.loop = FakeTimeLoop(self.clock)
        self.node = Node(self.clock, Path(self.tmp.name), policy=POLICY)
        self.run(self.node.start())
        self.generation = 0
        self.desired: dict[str, AgentSpec] = {}
        self.overrides: dict[str, str] = {}
        self.operations: dict[str, tuple[str, str]] = {}
        self.hung: set[int] = set()
        self.checked_starts = 0

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        self.node.abandon()
        self.run(asyncio.sleep(0))
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()
        self.tmp.cleanup()

    # -- the model ----------------------------------------------------------------

    def wanted_running(self, agent_id: str) -> bool:
        spec = self.desired.get(agent_id)
        if spec is None:
            return False
        override = self.overrides.get(agent_id)
        if override is not None:
            return override == "start"
        return spec.state is DesiredState.RUNNING

    def ended_for_good(self, agent_id: str) -> bool:
        record = self.node.controller.agent(AgentId(agent_id)).record
        return record.phase is Phase.FAILED or (
            not record.alive
            and not record.restart_requested
            and record.finished_fingerprint == self.desired[agent_id].fingerprint()
        )

    def live(self) -> list[str]:
        supervisor = self.node.supervisor
        return [h.agent_id for h in [*supervisor.running.values(), *supervisor.survivors.values()]]

    def heartbeat_all(self) -> None:
        for handle in list(self.node.supervisor.running.values()):
            spec = self.desired.get(handle.agent_id)
            tracked = self.node.controller.pids().get(handle.agent_id) == handle.pid
            if spec and spec.heartbeat and tracked and handle.pid not in self.hung:
                self.node.heartbeat(handle.agent_id)

    async def pass_time(self, seconds: float) -> None:
        end = self.clock.monotonic() + seconds
        while self.clock.monotonic() < end:
            self.heartbeat_all()
            self.clock.advance(min(0.5, end - self.clock.monotonic()))
            await self.node.settle()

    # -- rules --------------------------------------------------------------------

    @rule(agents=desired_states)
    def sync_a_new_generation(self, agents: dict[str, Variant]) -> None:
        self.generation += 1
        specs = tuple(variant.spec(agent_id) for agent_id, variant in sorted(agents.items()))
        self.run(self.node.apply(self.generation, *specs))
        self.desired = {spec.id: spec for spec in specs}
        self.overrides = {}

    @precondition(lambda self: self.generation > 0)
    @rule(older=st.booleans())
    def replay_or_stale_generation(self, older: bool) -> None:
        starts = len(self.node.supervisor.starts)
        current = self.node.controller.desired()
        if older:
            stale = NodeDesiredState(Generation(self.generation - 1), current.agents)
            with pytest.raises(StaleGeneration) as caught:
                self.run(self.node.controller.apply(stale))
            assert caught.value.current == self.generation
        else:
            outcome = self.run(self.node.controller.apply(current))
            assert not outcome.changed
        self.run(self.node.settle())
        assert len(self.node.supervisor.starts) == starts

    @rule(agent_id=st.sampled_from(POOL), how=st.sampled_from(["code0", "code1", "sigkill"]))
    def crash(self, agent_id: str, how: str) -> None:
        handle = self.node.supervisor.handle_of(AgentId(agent_id))
        if handle is None:
            return
        if how == "sigkill":
            self.node.supervisor.exit(handle, signal=signal.SIGKILL)
        else:
            self.node.supervisor.exit(handle, code=int(how[-1]))
        self.run(self.node.settle())

    @rule(agent_id=st.sampled_from(POOL))
    def hang(self, agent_id: str) -> None:
        handle = self.node.supervisor.handle_of(AgentId(agent_id))
        if handle is not None:
            self.hung.add(handle.pid)

    @rule(killed=st.booleans())
    def daemon_restart(self, killed: bool) -> None:
        if killed:
            self.node = self.run(self.node.crash_restart())
        else:
            self.node = self.run(self.node.graceful_restart())
        self.checked_starts = 0
        assert self.node.supervisor.survivors == {}, "every leftover adopted or stopped"

    @rule(
        agent_id=st.sampled_from(POOL),
        operation=st.sampled_from(["start", "stop", "restart"]),
        operation_id=st.sampled_from(["", *OPERATION_IDS]),
    )
    def operate(self, agent_id: str, operation: str, operation_id: str) -> None:
        previous = self.operations.get(operation_id) if operation_id else None
        try:
            outcome = self.run(
                self.node.controller.operate(
                    AgentId(agent_id), operation, operation_id=operation_id
                )
            )
        except NotFound:
            assert agent_id not in self.desired
            assert previous is None
            return
        except InvalidArgument:
            assert previous is not None
            assert previous != (agent_id, operation)
            return
        self.run(self.node.settle())
        if previous is not None:
            assert outcome.duplicate
            assert previous == (agent_id, operation)
            return
        assert not outcome.duplicate
        if operation_id:
            self.operations[operation_id] = (agent_id, operation)
        if operation != "restart":
            self.overrides[agent_id] = operation

    @rule(seconds=st.sampled_from([0.5, 1.5, 2.5, 4.0, 8.0]))
    def time_passes(self, seconds: float) -> None:
        self.run(self.pass_time(seconds))

    @rule()
    def quiet_time_converges(self) -> None:
        self.run(self.pass_time(QUIET_S))
        expected = {
            a for a in self.desired if self.wanted_running(a) and not self.ended_for_good(a)
        }
        assert set(self.node.controller.pids()) == expected
        for view in self.node.controller.agents():
            assert view.record.phase is not Phase.BACKOFF, view.record
            if view.record.agent_id in expected:
                assert view.record.phase is Phase.RUNNING, view.record

    # -- invariants ---------------------------------------------------------------

    @invariant()
    def at_most_one_live_process_per_agent_and_all_tracked(self) -> None:
        live = self.live()
        assert len(live) == len(set(live)), f"duplicate processes: {sorted(live)}"
        assert set(live) == set(self.node.controller.pids())

    @invariant()
    def nothing_desired_stopped_is_started(self) -> None:
        starts = self.node.supervisor.starts[self.checked_starts :]
        self.checked_starts = len(self.node.supervisor.starts)
        for start in starts:
            assert self.wanted_running(start.spec.id), f"{start.spec.id} started: {start}"
            assert start.spec.fingerprint() == self.desired[start.spec.id].fingerprint()

    @invariant()
    def conflicting_content_for_the_current_generation_is_refused(self) -> None:
        if self.generation == 0:
            return
        changed = NodeDesiredState(Generation(self.generation), (agent("other"),))
        if changed == self.node.controller.desired():
            return
        try:
            self.run(self.node.controller.apply(changed))
        except Conflict:
            return
        raise AssertionError("other content for the current generation was accepted")


ControllerMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestControllerProperties = ControllerMachine.TestCase
