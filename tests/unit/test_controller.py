"""The daemon's Controller over fakes: a FakeSupervisor, a MemoryStore and a FakeClock.

Each test runs on an event loop whose clock *is* the FakeClock (``FakeTimeLoop``), so
the work queue's timers (``add_after``) fire exactly when the test moves the clock,
and ``Node.settle`` runs the workers until nothing is left to do. Nothing here sleeps.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from reconciler.daemon.clock import FakeClock
from reconciler.daemon.controller import Controller, NodeProcess, ProcessOwner, UpdateOutcome
from reconciler.daemon.events import EventLog
from reconciler.daemon.store import MemoryStore, ProcessEntry
from reconciler.daemon.supervisor import FakeSupervisor, ProcessHandle
from reconciler.model import (
    AgentId,
    AgentSpec,
    Conflict,
    DesiredState,
    EventType,
    Generation,
    Heartbeat,
    HeartbeatSpec,
    InvalidArgument,
    NodeDesiredState,
    NodeId,
    NotFound,
    Override,
    Phase,
    ReportedStatus,
    RestartPolicy,
    StaleGeneration,
)
from reconciler.reconcile import Policy

NODE = NodeId("node-1")
T = TypeVar("T")


# -- the harness ----------------------------------------------------------------------


class FakeTimeLoop(asyncio.SelectorEventLoop):
    """An event loop that reads the time from a FakeClock, so its timers follow it."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.fake_clock = clock

    def time(self) -> float:
        return self.fake_clock.monotonic()


def run(scenario: Callable[[FakeClock], Coroutine[Any, Any, T]]) -> T:
    """Run ``scenario(clock)`` on a FakeTimeLoop over a fresh FakeClock."""
    clock = FakeClock()
    with asyncio.Runner(loop_factory=lambda: FakeTimeLoop(clock)) as runner:
        return runner.run(scenario(clock))


class Verbatim:
    """A CommandResolver that accepts every command as it is (no file system)."""

    def resolve(self, command: Sequence[str], *, field: str) -> tuple[str, ...]:
        return tuple(command)

    def check_allowed(self, path: str, *, field: str) -> None:
        return None


def survivors_of(
    supervisor: FakeSupervisor, foreign: set[int]
) -> Callable[[ProcessOwner], list[NodeProcess]]:
    """A node-process scanner over the processes a previous daemon left running.

    Pids in ``foreign`` are other programs' processes: they carry no agent environment.
    """

    def scan(owner: ProcessOwner) -> list[NodeProcess]:
        return [
            NodeProcess(h.agent_id, pid=h.pid, start_ticks=h.start_ticks, cmdline=h.cmdline)
            for h in supervisor.survivors.values()
            if h.pid not in foreign
        ]

    return scan


@dataclass
class Node:
    """One daemon's controller over fakes; ``restart`` builds the next daemon."""

    clock: FakeClock
    config_dir: Path
    store: MemoryStore = field(default_factory=MemoryStore)
    policy: Policy = field(default_factory=Policy)
    foreign: set[int] = field(default_factory=set)
    boot_id: str = "boot-1"
    supervisor: FakeSupervisor = field(init=False)
    events: EventLog = field(init=False)
    controller: Controller = field(init=False)

    def __post_init__(self) -> None:
        self.build(FakeSupervisor(clock=self.clock))

    def build(self, supervisor: FakeSupervisor) -> None:
        self.supervisor = supervisor
        self.events = EventLog(node_id=NODE, wall=self.clock.wall)
        self.controller = Controller(
            owner=ProcessOwner(NODE, "/var/lib/reconciler"),
            store=self.store,
            supervisor=supervisor,
            commands=Verbatim(),
            policy=self.policy,
            clock=self.clock,
            events=self.events,
            agent_env={"RECONCILER_HEARTBEAT_SOCKET": "/run/hb.sock"},
            config_dir=self.config_dir,
            workers=2,
            scan=survivors_of(supervisor, self.foreign),
            boot_id=self.boot_id,
        )

    async def start(self) -> Node:
        await self.controller.start()
        await self.settle()
        return self

    async def settle(self, *, passes_may_wait: bool = False) -> None:
        """Let the workers run until the controller stays idle for a few loop turns
        (with ``passes_may_wait``: until no agent waits, while passes may be blocked)."""
        quiet = 0
        for _ in range(20_000):
            await asyncio.sleep(0)
            idle = self.controller.queue_depth == 0 if passes_may_wait else self.controller.idle
            quiet = quiet + 1 if idle else 0
            if quiet >= 8:
                return
        raise AssertionError("the work queue never went idle")

    async def advance(self, seconds: float, *, step_s: float = 0.25) -> None:
        """Move time forward in small steps, letting due timers and workers run."""
        end = self.clock.monotonic() + seconds
        while self.clock.monotonic() < end:
            self.clock.advance(min(step_s, end - self.clock.monotonic()))
            await self.settle()

    async def saved(self) -> dict[AgentId, ProcessEntry]:
        """Wait until the background writer has saved the live pids; return them."""
        for _ in range(100_000):
            saved = self.store.processes
            if {a: e.pid for a, e in saved.items()} == self.controller.pids():
                return saved
            await asyncio.sleep(0)
        raise AssertionError("the process list was never saved")

    async def apply(self, generation: int, *agents: AgentSpec) -> None:
        await self.controller.apply(NodeDesiredState(Generation(generation), agents))
        await self.settle()

    async def crash_restart(self) -> Node:
        """The daemon is SIGKILLed (nothing more is saved) and a new one starts."""
        self.abandon()
        return await self._successor()

    async def graceful_restart(self) -> Node:
        """The daemon stops (SIGTERM, agents left running) and a new one starts."""
        await self.controller.stop()
        return await self._successor()

    def abandon(self) -> None:
        self.controller._queue.close()
        for task in list(self.controller._tasks):
            task.cancel()

    async def _successor(self) -> Node:
        await asyncio.sleep(0)
        successor = FakeSupervisor(clock=self.clock, first_pid=self.supervisor._next_pid + 1000)
        for handle in self.supervisor.running.values():
            successor.add_survivor(
                handle.agent_id,
                pid=handle.pid,
                start_ticks=handle.start_ticks,
                cmdline=handle.cmdline,
            )
        self.build(successor)
        return await self.start()

    # -- reading

    def phase(self, agent_id: str) -> Phase:
        return self.controller.agent(AgentId(agent_id)).record.phase

    def live(self, agent_id: str) -> list[ProcessHandle]:
        """Every process of ``agent_id`` alive now, tracked or not."""
        every = [*self.supervisor.running.values(), *self.supervisor.survivors.values()]
        return [h for h in every if h.agent_id == agent_id]

    def starts_of(self, agent_id: str) -> int:
        return sum(1 for s in self.supervisor.starts if s.spec.id == agent_id)

    def heartbeat(self, agent_id: str, status: ReportedStatus = ReportedStatus.HEALTHY) -> None:
        handle = self.supervisor.handle_of(AgentId(agent_id))
        beat = Heartbeat(
            agent_id=AgentId(agent_id),
            pid=handle.pid if handle else 1,
            timestamp=self.clock.wall(),
            version="v1",
            status=status,
            cpu_percent=1.5,
            memory_bytes=1024,
        )
        self.controller.record(beat, received_at_s=self.clock.monotonic(), transport="unix")


def agent(agent_id: str, **changes: Any) -> AgentSpec:
    base = AgentSpec(id=AgentId(agent_id), command=("/bin/sleep", "3600"), version="1")
    return replace(base, **changes)


def node_test(body: Callable[[Node], Awaitable[None]], tmp_path: Path, **node_args: Any) -> None:
    async def scenario(clock: FakeClock) -> None:
        node = await Node(clock, tmp_path / "agent-config", **node_args).start()
        try:
            await body(node)
        finally:
            node.abandon()

    run(scenario)


# -- desired state and generations ----------------------------------------------------


def test_a_newer_generation_is_accepted_persisted_and_acted_on(tmp_path: Path) -> None:
    async def body(node: Node) -> None:
        outcome = await node.controller.apply(NodeDesiredState(Generation(3), (agent("a"),)))
        assert outcome.changed
        assert outcome.generation == 3
        assert node.store.desired.generation == 3, "persisted before the answer"
        await node.settle()
        assert node.phase("a") is Phase.RUNNING
        assert node.starts_of("a") == 1
        assert [e.type for e in node.events.recent()][:1] == [EventType.SPEC_APPLIED]

    node_test(body, tmp_path)


def test_the_same_generation_again_is_idempotent(tmp_path: Path) -> None:
    async def body(node: Node) -> None:
        state = NodeDesiredState(Generation(1), (agent("a"), agent("b")))
        await node.controller.apply(state)
        await node.settle()
        again = await node.controller.apply(
            NodeDesiredState(Generation(1), (agent("a"), agent("b")))
        )
        await node.settle()
        assert not again.changed
        assert node.store.saves == 1
        assert len(node.supervisor.starts) == 2

    node_test(body, tmp_path)


def test_the_same_generation_with_other_content_is_refused(tmp_path: Path) -> None:
    async def body(node: Node) -> None:
        await node.apply(1, agent("a"))
        with pytest.raises(Conflict, match="generation 1"):
            await node.controller.apply(NodeDesiredState(Generation(1), (agent("a", version="2"),)))
        assert node.controller.desired().agents[0].version == "1"
        assert node.store.saves == 1

    node_test(body, tmp_path)


def test_an_older_generation_is_refused_naming_the_current_one(tmp_path: Path) -> None:
    async def body(node: Node) -> None:
        await node.apply(5, agent("a"))
        with pytest.raises(StaleGeneration) as caught:
            await node.controller.apply(NodeDesiredState(Generation(4), (agent("b"),)))
        assert caught.value.current == 5
        assert caught.value.offered == 4
        assert node.controller.generation == 5
        assert set(node.controller.pids()) == {"a"}

    node_test(body, tmp_path)


def test_a_desired_state_with_one_invalid_agent_changes_nothing(tmp_path: Path) -> None:
    async def body(node: Node) -> None:
        await node.apply(1, agent("a"))
        bad = agent("b", command=("/bin/sleep", "1\x00"))
        with pytest.raises(InvalidArgument) as caught:
            await node.controller.apply(NodeDesiredState(Generation(2), (agent("c"), bad)))
        assert caught.value.field == "agents[1].command[1]"
        assert node.controller.generation == 1
        assert node.store.saves == 1
        assert node.starts_of("c") == 0

    node_test(body, tmp_path)


def test_a_new_generation_restarts_only_the_changed_and_stops_the_removed(tmp_path: Path) -> None:
    async def body(node: Node) -> None:
        await node.apply(1, agent("kept"), agent("changed"), agent("removed"))
        before = node.controller.pids()
        await node.apply(2, agent("kept", labels={"x": "y"}), agent("changed", version="2"))
        after = node.controller.pids()
        assert after["kept"] == before["kept"], "a label change does not restart"
        assert after["changed"] != before["changed"]
        assert "removed" not in after
        assert [v.record.agent_id for v in node.controller.agents()] == ["changed", "kept"]
        assert node.live("removed") == []

    node_test(body, tmp_path)


# -- observed_generation --------------------------------------------------------------


def test_observed_generation_follows_only_once_every_touched_agent_was_reconciled(
    tmp_path: Path,
) -> None:
    async def body(node: Node) -> None:
        await node.controller.apply(NodeDesiredState(Generation(1), (agent("a"),)))
        assert node.controller.observed_generation == 0
        await node.settle()
        assert node.controller.observed_generation == 1

    node_test(body, tmp_path)


def test_observed_generation_does_not_claim_a_generation_whose_agents_wait(
    tmp_path: Path,
) -> None:
    """A pass over generation 2 that ends while generation 3 is being applied does not
    make generation 3 observed before its own agents were reconciled."""

    async def body(node: Node) -> None:
        await node.apply(1, agent("x"))
        loop = asyncio.get_running_loop()
        gate = asyncio.Event()
        passed = threading.Event()
        start = node.supervisor.start

        async def slow_start(spec: AgentSpec, *, env: Any) -> ProcessHandle:
            if spec.id == "slow":
                await gate.wait()
            handle = await start(spec, env=env)
            passed.set()
            return handle

        node.supervisor.start = slow_start  # type: ignore[method-assign]
        await node.controller.apply(NodeDesiredState(Generation(2), (agent("x"), agent("slow"))))
        await node.controller.operate(AgentId("x"), "stop")
        await node.settle(passes_may_wait=True)  # a worker waits inside the start of "slow"
        assert node.controller.observed_generation == 1
        save_overrides = node.store.save_overrides

        def saving(overrides: Any) -> None:
            save_overrides(overrides)
            passed.clear()
            loop.call_soon_threadsafe(gate.set)
            passed.wait(timeout=10)

        node.store.save_overrides = saving  # type: ignore[method-assign]
        state = NodeDesiredState(Generation(3), (agent("x"), agent("slow"), agent("new")))
        await node.controller.apply(state)
        assert passed.is_set(), "the pass over generation 2 ended during the apply"
        assert node.starts_of("new") == 0
        assert node.controller.observed_generation < 3
        await node.settle()
        assert node.starts_of("new") == 1
        assert node.controller.observed_generation == 3

    node_test(body, tmp_path)


# -- operations -----------------------------------------------------------------------


def test_a_stop_override_is_persisted_and_dropped_by_a_newer_generation(tmp_path: Path) -> None:
    async def body(node: Node) -> None:
        await node.apply(1, agent("a"))
        await node.controller.operate(AgentId("a"), "stop")
        await node.settle()
        assert node.phase("a") is Phase.STOPPED
        assert node.store.overrides[AgentId("a")].override is Override.STOP
        assert node.controller.agent(AgentId("a")).override is Override.STOP
        assert node.live("a") == []
        await node.apply(2, agent("a"))
        assert node.store.overrides == {}
        assert node.controller.agent(AgentId("a")).override is None
        assert node.phase("a") is Phase.RUNNING
        assert node.starts_of("a") == 2

    node_test(body, tmp_path)


def test_a_start_override_runs_an_agent_desired_stopped_until_a_newer_generation(
    tmp_path: Path,
) -> None:
    async def body(node: Node) -> None:
        await node.apply(1, agent("a", state=DesiredState.STOPPED))
        assert node.starts_of("a") == 0
        await node.controller.operate(AgentId("a"), "start")
        await node.settle()
        assert node.phase("a") is Phase.RUNNING
        await node.apply(2, agent("a", state=DesiredState.STOPPED))
        assert node.phase("a") is Phase.STOPPED
        assert node.live("a") == []

    node_test(body, tmp_path)


def test_an_override_survives_a_daemon_restart(tmp_path: Path) -> None:
    async def body(node: Node) -> None:
        await node.apply(1, agent("a"))
        await node.controller.operate(AgentId("a"), "stop")
        await node.settle()
        node = await node.crash_restart()
        assert node.phase("a") is Phase.STOPPED
        assert node.supervisor.starts == []
        assert node.controller.agent(AgentId("a")).override is Override.STOP

    node_test(body, tmp_path)


def test_an_operation_id_makes_a_retried_restart_act_once(tmp_path: Path) -> None:
    async def body(node: Node) -> None:
        await node.apply(1, agent("a"))
        first = await node.controller.operate(AgentId("a"), "restart", operation_id="op-1")
        await node.settle()
        again = await node.controller.operate(AgentId("a"), "restart", operation_id="op-1")
        await node.settle()
        assert not first.duplicate
        assert again.duplicate
        assert again.message == first.message
        assert node.starts_of("a") == 2, "started once, restarted once"
        assert node.controller.agent(AgentId("a")).record.restart_count == 1

    node_test(body, tmp_path)


def test_an_operation_id_reused_for_another_operation_is_refused(tmp_path: Path) -> None:
    async def body(node: Node) -> None:
        await node.apply(1, agent("a"), agent("b"))
        await node.controller.operate(AgentId("a"), "stop", operation_id="op-1")
        with pytest.raises(InvalidArgument, match="operation_id"):
            await node.controller.operate(AgentId("a"), "restart", operation_id="op-1")
        with pytest.raises(InvalidArgument, match="operation_id"):
            await node.controller.operate(AgentId("b"), "stop", operation_id="op-1")
        await node.settle()
        assert node.phase("b") is Phase.RUNNING

    node_test(body, tmp_path)


@pytest.mark.parametrize(
    ("agent_id", "operation", "error"),
    [
        pytest.param("nobody", "restart", NotFound, id="unknown-agent"),
        pytest.param("a", "reboot", InvalidArgument, id="unknown-operation"),
    ],
)
def test_an_operation_on_an_unknown_agent_or_verb_is_refused(
    tmp_path: Path, agent_id: str, operation: str, error: type[Exception]
) -> None:
    async def body(node: Node) -> None:
        await node.apply(1, agent("a"))
        with pytest.raises(error):
            await node.controller.operate(AgentId(agent_id), operation)
        assert node.starts_of("a") == 1

    node_test(body, tmp_path)


def test_a_crash_loop_backs_off_and_restart_clears_the_backoff(tmp_path: Path) -> None:
    async def body(node: Node) -> None:
        await node.apply(1, agent("a"))
        for _ in range(3):
            await node.advance(2.0)
            node.supervisor.exit(AgentId("a"), code=1)
            await node.settle()
        view = node.controller.agent(AgentId("a"))
        assert view.record.phase is Phase.BACKOFF
        assert view.record.backoff is not None
        assert view.record.backoff.delay_s == 2.0, "0 s, then 1 s, then 2 s"
        starts = node.starts_of("a")
        await node.controller.operate(AgentId("a"), "restart")
        await node.settle()
        record = node.controller.agent(AgentId("a")).record
        assert node.starts_of("a") == starts + 1, "at once, not after the backoff"
        assert record.phase is Phase.RUNNING
        assert record.backoff is None
        assert record.consecutive_failures == 0

    node_test(body, tmp_path)


def test_a_backoff_ends_on_its_own_timer(tmp_path: Path) -> None:
    async def body(node: Node) -> None:
        await node.apply(1, agent("a"))
        node.supervisor.exit(AgentId("a"), code=1)
        await node.settle()
        assert node.starts_of("a") == 2, "the first restart is immediate"
        node.supervisor.exit(AgentId("a"), code=1)
        await node.settle()
        assert node.phase("a") is Phase.BACKOFF
        await node.advance(0.75)
        assert node.starts_of("a") == 2
        await node.advance(0.5)
        assert node.starts_of("a") == 3
        assert node.phase("a") is Phase.RUNNING

    node_test(body, tmp_path)


# -- rolling updates ------------------------------------------------------------------


def test_a_rolled_back_agent_starts_at_once_without_the_backoff_its_update_earned(
    tmp_path: Path,
) -> None:
    async def body(node: Node) -> None:
        await node.apply(1, agent("a"))
        update = asyncio.ensure_future(
            node.controller.push_update(
                AgentId("a"), version="2", command=("/bin/false",), deadline_s=5.0
            )
        )
        while not update.done():  # the new version exits at once, every time
            for start in node.supervisor.starts:
                if start.spec.version == "2" and start.handle.pid in node.supervisor.running:
                    node.supervisor.exit(start.handle, code=1)
            await node.advance(0.25)
        result = update.result()
        assert result.outcome is UpdateOutcome.ROLLED_BACK, result.message
        assert result.current_version == "1"
        record = node.controller.agent(AgentId("a")).record
        assert record.phase is Phase.RUNNING
        assert record.backoff is None
        assert node.supervisor.starts[-1].spec.version == "1"
        assert node.events.counts.get(EventType.UPDATE_ROLLED_BACK) == 1

    node_test(body, tmp_path, policy=Policy(backoff_initial_s=30.0, backoff_max_s=60.0))


@pytest.mark.parametrize(
    ("version", "command", "field"),
    [
        pytest.param("2\x00", (), "version", id="nul-in-version"),
        pytest.param("v" * 200, (), "version", id="version-too-long"),
        pytest.param("2", ("/bin/sleep", "1\x00"), "command[1]", id="nul-in-argument"),
    ],
)
def test_an_invalid_update_is_refused_naming_the_field_and_changes_nothing(
    tmp_path: Path, version: str, command: tuple[str, ...], field: str
) -> None:
    async def body(node: Node) -> None:
        await node.apply(1, agent("a"))
        update = asyncio.ensure_future(
            node.controller.push_update(
                AgentId("a"), version=version, command=command, deadline_s=5.0
            )
        )
        await node.advance(12.0, step_s=1.0)  # past both deadlines, had it been taken
        with pytest.raises(InvalidArgument) as caught:
            update.result()
        assert caught.value.field == field
        assert node.starts_of("a") == 1
        view = node.controller.agent(AgentId("a"))
        assert view.spec is not None
        assert view.spec.version == "1"

    node_test(body, tmp_path)


# -- heartbeats -----------------------------------------------------------------------

HB = HeartbeatSpec(interval_s=2.0, timeout_s=6.0)


def test_an_agent_is_running_at_its_first_heartbeat_degraded_when_late_restarted_when_hung(
    tmp_path: Path,
) -> None:
    async def body(node: Node) -> None:
        await node.apply(1, agent("a", heartbeat=HB))
        assert node.phase("a") is Phase.STARTING
        node.heartbeat("a")
        await node.settle()
        assert node.phase("a") is Phase.RUNNING
        pid = node.controller.pids()["a"]
        await node.advance(3.25)
        assert node.phase("a") is Phase.DEGRADED
        assert node.controller.pids()["a"] == pid
        await node.advance(3.0)
        assert node.controller.pids()["a"] != pid, "restarted after its timeout"
        assert node.live("a") != []
        assert len(node.live("a")) == 1
        record = node.controller.agent(AgentId("a")).record
        assert record.restart_count == 1
        assert record.last_exit is not None
        assert record.last_exit.signal == signal.SIGTERM
        assert node.events.counts.get(EventType.AGENT_UNHEALTHY) == 1

    node_test(body, tmp_path)


def test_a_late_agent_that_heartbeats_again_recovers_without_a_restart(tmp_path: Path) -> None:
    async def body(node: Node) -> None:
        await node.apply(1, agent("a", heartbeat=HB))
        node.heartbeat("a")
        await node.advance(4.0)
        assert node.phase("a") is Phase.DEGRADED
        node.heartbeat("a")
        await node.settle()
        assert node.phase("a") is Phase.RUNNING
        assert node.starts_of("a") == 1

    node_test(body, tmp_path)


def test_an_agent_reporting_unhealthy_is_degraded(tmp_path: Path) -> None:
    async def body(node: Node) -> None:
        await node.apply(1, agent("a", heartbeat=HB))
        node.heartbeat("a", ReportedStatus.UNHEALTHY)
        await node.settle()
        record = node.controller.agent(AgentId("a")).record
        assert record.phase is Phase.DEGRADED
        assert record.reported_status is ReportedStatus.UNHEALTHY
        assert record.reported_version == "v1"

    node_test(body, tmp_path)


def test_a_heartbeat_from_an_unknown_agent_is_kept_as_unmanaged(tmp_path: Path) -> None:
    async def body(node: Node) -> None:
        await node.apply(1, agent("a"))
        node.heartbeat("stranger")
        assert set(node.controller.unmanaged()) == {"stranger"}
        assert node.controller.identity(AgentId("stranger")) is None
        with pytest.raises(NotFound):
            node.controller.agent(AgentId("stranger"))

    node_test(body, tmp_path)


def test_identity_names_the_live_pid_and_the_token_handed_to_the_agent(tmp_path: Path) -> None:
    async def body(node: Node) -> None:
        await node.apply(1, agent("a"), agent("off", state=DesiredState.STOPPED))
        identity = node.controller.identity(AgentId("a"))
        assert identity is not None
        started = node.supervisor.starts[0]
        assert identity.pid == started.handle.pid
        assert identity.token
        assert identity.token == started.env["RECONCILER_AGENT_TOKEN"]
        assert started.env["RECONCILER_NODE_ID"] == NODE
        assert started.env["RECONCILER_HEARTBEAT_SOCKET"] == "/run/hb.sock"
        stopped = node.controller.identity(AgentId("off"))
        assert stopped is not None
        assert stopped.pid is None

    node_test(body, tmp_path)


# -- adoption -------------------------------------------------------------------------


def test_a_restarted_daemon_adopts_live_agents_and_starts_the_dead(tmp_path: Path) -> None:
    async def body(node: Node) -> None:
        await node.apply(1, agent("alive", heartbeat=HB), agent("dead"))
        node.heartbeat("alive")
        await node.settle()
        await node.controller.stop()
        pids = dict(node.controller.pids())
        node.supervisor.running.pop(pids["dead"])  # it dies while no daemon watches
        node = await node._successor()
        assert [h.pid for h in node.supervisor.adopted] == [pids["alive"]]
        assert node.controller.pids()["alive"] == pids["alive"]
        assert node.phase("alive") is Phase.RUNNING
        assert node.starts_of("alive") == 0, "adopted, not restarted"
        assert node.starts_of("dead") == 1
        assert node.controller.agent(AgentId("alive")).record.restart_count == 0
        identity = node.controller.identity(AgentId("alive"))
        assert identity is not None
        assert identity.token, "the adopted agent's token is kept"
        assert node.events.counts.get(EventType.AGENT_ADOPTED) == 1

    node_test(body, tmp_path)


def test_an_adopted_agent_keeps_the_time_it_was_started(tmp_path: Path) -> None:
    async def body(node: Node) -> None:
        await node.apply(1, agent("a"))
        started = node.controller.agent(AgentId("a")).record.started_at_s
        await node.advance(30.0, step_s=10.0)
        await node.saved()
        node = await node.crash_restart()
        assert node.supervisor.adopted != []
        assert node.controller.agent(AgentId("a")).record.started_at_s == started

    node_test(body, tmp_path)


def test_an_adopted_agent_whose_spec_changed_while_away_is_restarted(tmp_path: Path) -> None:
    async def body(node: Node) -> None:
        await node.apply(1, agent("a"))
        await node.controller.stop()
        pid = node.controller.pids()["a"]
        node.store.desired = NodeDesiredState(Generation(2), (agent("a", version="2"),))
        node = await node._successor()
        assert node.live("a") != []
        assert [h.pid for h in node.live("a")] != [pid]
        assert len(node.live("a")) == 1
        assert node.supervisor.starts[0].spec.version == "2"

    node_test(body, tmp_path)


def test_a_process_spawned_but_not_yet_recorded_is_not_duplicated_after_a_crash(
    tmp_path: Path,
) -> None:
    async def body(node: Node) -> None:
        node.store.save_processes = lambda processes: None  # type: ignore[method-assign]
        await node.apply(1, agent("a"), agent("b"))
        assert node.store.processes == {}
        node = await node.crash_restart()
        assert len(node.live("a")) == 1
        assert len(node.live("b")) == 1
        assert node.phase("a") is Phase.RUNNING
        assert node.events.counts.get(EventType.AGENT_STOPPED) == 2

    node_test(body, tmp_path)


def test_a_saved_pid_now_used_by_another_process_is_neither_adopted_nor_stopped(
    tmp_path: Path,
) -> None:
    async def body(node: Node) -> None:
        await node.apply(1, agent("a"))
        saved = (await node.saved())[AgentId("a")]
        node.abandon()
        node.supervisor.running.clear()  # the agent died with the daemon...
        stranger = ProcessHandle(AgentId("a"), saved.pid, saved.start_ticks + 1, saved.cmdline)
        node.supervisor.running[saved.pid] = stranger  # ...and its pid was reused
        node.foreign.add(saved.pid)
        node = await node._successor()
        assert node.supervisor.adopted == []
        assert node.supervisor.stops == []
        assert saved.pid in node.supervisor.survivors
        assert node.starts_of("a") == 1
        assert node.controller.pids()["a"] != saved.pid

    node_test(body, tmp_path)


def test_after_a_reboot_a_process_matching_a_saved_one_is_not_adopted(tmp_path: Path) -> None:
    async def body(node: Node) -> None:
        await node.apply(1, agent("a"))
        saved = (await node.saved())[AgentId("a")]
        assert saved.boot_id == "boot-1"
        node.abandon()
        node.supervisor.running.clear()  # the node rebooted: every agent is gone...
        stranger = ProcessHandle(AgentId("a"), saved.pid, saved.start_ticks, saved.cmdline)
        node.supervisor.running[saved.pid] = stranger  # ...and pid and ticks match again
        node.foreign.add(saved.pid)
        node.boot_id = "boot-2"
        node = await node._successor()
        assert node.supervisor.adopted == []
        assert node.supervisor.stops == []
        assert node.starts_of("a") == 1
        assert node.controller.pids()["a"] != saved.pid

    node_test(body, tmp_path)


async def _finished_saved(node: Node, agent_id: str) -> None:
    for _ in range(100_000):
        if AgentId(agent_id) in node.store.finished:
            return
        await asyncio.sleep(0)
    raise AssertionError("finished.json was never saved")


@pytest.mark.parametrize(
    ("boot_id", "starts"),
    [pytest.param("boot-1", 1, id="same-boot"), pytest.param("boot-2", 2, id="after-a-reboot")],
)
def test_an_agent_that_completed_stays_down_for_the_next_daemon_of_the_same_boot(
    tmp_path: Path, boot_id: str, starts: int
) -> None:
    async def body(node: Node) -> None:
        await node.apply(1, agent("job", restart_policy=RestartPolicy.ON_FAILURE))
        node.supervisor.exit(AgentId("job"), code=0)
        await node.settle()
        await _finished_saved(node, "job")
        assert node.phase("job") is Phase.STOPPED
        node.boot_id = boot_id
        node = await node.crash_restart()
        assert node.starts_of("job") == starts - 1  # the new supervisor's own count
        if starts == 1:
            assert node.phase("job") is Phase.STOPPED
            last_exit = node.controller.agent(AgentId("job")).record.last_exit
            assert last_exit is not None
            assert last_exit.code == 0

    node_test(body, tmp_path)


def test_the_process_list_is_saved_for_the_next_daemon(tmp_path: Path) -> None:
    async def body(node: Node) -> None:
        await node.apply(1, agent("a"))
        entry = (await node.saved())[AgentId("a")]
        assert isinstance(entry, ProcessEntry)
        assert entry.pid == node.controller.pids()["a"]
        assert entry.fingerprint == agent("a").fingerprint()

    node_test(body, tmp_path)


def test_a_never_restart_policy_leaves_a_failed_agent_down(tmp_path: Path) -> None:
    async def body(node: Node) -> None:
        await node.apply(1, agent("a", restart_policy=RestartPolicy.NEVER))
        node.supervisor.exit(AgentId("a"), code=3)
        await node.advance(120.0, step_s=5.0)
        assert node.phase("a") is Phase.FAILED
        assert node.starts_of("a") == 1

    node_test(body, tmp_path)
