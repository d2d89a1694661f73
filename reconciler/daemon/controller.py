"""The daemon's control loop: desired state in, processes out, one writer of records.

Everything that happens to an agent (a new desired state, an operator's operation, a
process exit, a heartbeat, a timer) only updates facts and enqueues the agent's id.
Workers take ids from the ``WorkQueue`` and run ``reconcile`` on the current snapshot,
then apply the returned actions through the supervisor. Records are frozen values
replaced whole, only here, and phases change only through the model's checked
``transition`` (via ``reconciler.reconcile.observe``).

Not here: process mechanics (``supervisor``), persistence (``store``), the gRPC
surface (``service``), heartbeat sockets (``heartbeat``), wiring (``app``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from reconciler import failpoints
from reconciler.daemon import procfs
from reconciler.daemon.clock import Clock
from reconciler.daemon.events import EventLog
from reconciler.daemon.heartbeat import AgentIdentity
from reconciler.daemon.store import (
    FinishedEntry,
    OperationResult,
    OverrideEntry,
    Patches,
    ProcessEntry,
    StateStore,
)
from reconciler.daemon.supervisor import (
    AGENT_CONFIG_FILE_ENV,
    AGENT_ID_ENV,
    ProcessHandle,
    SpawnError,
    Supervisor,
)
from reconciler.daemon.workqueue import WorkQueue
from reconciler.model.errors import Conflict, InvalidArgument, NotFound, StaleGeneration
from reconciler.model.events import EventType
from reconciler.model.heartbeat import Heartbeat
from reconciler.model.ids import AgentId, Generation, NodeId, OperationId, is_valid_agent_id
from reconciler.model.spec import (
    AgentSpec,
    DesiredState,
    NodeDesiredState,
    validate_node_state,
    validate_spec,
)
from reconciler.model.status import AgentRecord, ExitInfo, Override, Phase
from reconciler.reconcile import (
    Action,
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
    apply_backoff,
    apply_phase,
    apply_reset_failures,
    apply_stop_requested,
    on_exit,
    on_heartbeat,
    on_restart_requested,
    on_sample,
    on_started,
)

__all__ = [
    "AgentView",
    "ApplyOutcome",
    "CommandResolver",
    "Controller",
    "NodeProcess",
    "Operation",
    "OperationOutcome",
    "ProcessOwner",
    "ResourceTracker",
    "UpdateOutcome",
    "UpdateResult",
    "orphaned_node_processes",
    "scan_node_processes",
]

_T = TypeVar("_T")
log = logging.getLogger(__name__)
tracer = trace.get_tracer("reconciler.daemon")


class Operation:
    """The operator's verbs (plain strings, as on the wire)."""

    START = "start"
    STOP = "stop"
    RESTART = "restart"
    ALL = frozenset({START, STOP, RESTART})


@dataclass(frozen=True, slots=True)
class ApplyOutcome:
    """The answer to a new desired state."""

    generation: Generation
    changed: bool


@dataclass(frozen=True, slots=True)
class OperationOutcome:
    """The answer to an operation; the same again for a retried operation id."""

    agent_id: AgentId
    operation: str
    message: str
    duplicate: bool = False


class UpdateOutcome(enum.StrEnum):
    """How a PushUpdate ended."""

    SUCCEEDED = "succeeded"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    UNCHANGED = "unchanged"


@dataclass(frozen=True, slots=True)
class UpdateResult:
    """The answer to a PushUpdate; the same again for a retried operation id."""

    outcome: UpdateOutcome
    previous_version: str
    current_version: str
    message: str
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class AgentView:
    """One agent as ListAgents shows it: derived from the record, never stored twice."""

    record: AgentRecord
    spec: AgentSpec | None
    override: Override | None


@dataclass(frozen=True, slots=True)
class _Beat:
    """The latest heartbeat of an agent and when it arrived (both clocks)."""

    heartbeat: Heartbeat
    received_at_s: float
    received_wall_s: float


@dataclass(slots=True)
class _Gate:
    """Serialises the calls sharing one operation id; dropped when the last leaves."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class ResourceTracker(Protocol):
    """Samples live agents' resources (``reconciler.daemon.monitor.ResourceMonitor``)."""

    def track(self, agent_id: AgentId, pid: int, *, start_ticks: int | None = None) -> None: ...
    def untrack(self, agent_id: AgentId) -> None: ...
    def forget(self, agent_id: AgentId) -> None: ...


class CommandResolver(Protocol):
    """Resolves and allow-lists ``command[0]`` (``reconciler.daemon.commands``)."""

    def resolve(self, command: Sequence[str], *, field: str) -> tuple[str, ...]: ...

    def check_allowed(self, path: str, *, field: str) -> None: ...


@dataclass(frozen=True, slots=True)
class NodeProcess:
    """A live process whose environment names this node and one of its agents."""

    agent_id: AgentId
    pid: int
    start_ticks: int
    cmdline: tuple[str, ...]


NODE_ID_ENV = "RECONCILER_NODE_ID"
DAEMON_DIR_ENV = "RECONCILER_DAEMON_DIR"
#: Scans for an exited agent's leftovers before giving up on one that keeps changing.
_LEFTOVER_ROUNDS = 3


@dataclass(frozen=True, slots=True)
class ProcessOwner:
    """Whose agent processes these are: a node, and the state directory of the daemon
    that runs it, both put into each agent's environment (``environment``).

    The node id alone does not tell two daemons on one host apart (a trial
    ``reconciler dev`` beside the node's daemon shares its host name); with the state
    directory, which one daemon at a time may hold, neither takes the other's agents
    for strays of its own.
    """

    node_id: NodeId
    daemon_dir: str

    def environment(self) -> dict[str, str]:
        """The marks each agent of this owner carries in its environment."""
        return {NODE_ID_ENV: self.node_id, DAEMON_DIR_ENV: self.daemon_dir}


def scan_node_processes(owner: ProcessOwner) -> list[NodeProcess]:
    """Every live process started for an agent of ``owner`` (read from /proc)."""
    return _node_processes(owner, procfs.scan())


def orphaned_node_processes(owner: ProcessOwner, *, exclude: Set[int]) -> list[NodeProcess]:
    """The processes of ``owner``'s agents that this daemon inherited.

    The daemon is a child subreaper: when an agent exits, the children it leaves are
    re-parented to the daemon. So an exited agent's leftovers are among the daemon's
    own children, found without reading every process's environment (a full scan
    costs ~0.1 ms per process, too much on every restart of a node with 1,000 agents);
    ``exclude`` skips the pids the daemon already tracks (its live agents).
    """
    children = [pid for pid in procfs.children_of(os.getpid()) if pid not in exclude]
    stats = (procfs.read_stat(pid) for pid in children)
    return _node_processes(owner, [s for s in stats if s is not None])


def _node_processes(owner: ProcessOwner, stats: Iterable[procfs.ProcStat]) -> list[NodeProcess]:
    marks = owner.environment()
    found = []
    for stat in stats:
        if stat.zombie:
            continue
        environ = procfs.read_environ(stat.pid, (*marks, AGENT_ID_ENV))
        agent_id = environ.pop(AGENT_ID_ENV, "")
        if environ != marks or not is_valid_agent_id(agent_id):
            continue
        cmdline = procfs.read_cmdline(stat.pid)
        if cmdline:
            found.append(NodeProcess(AgentId(agent_id), stat.pid, stat.start_ticks, cmdline))
    return found


class Controller:
    """Owns the node's desired state and every agent record."""

    def __init__(
        self,
        *,
        owner: ProcessOwner,
        store: StateStore,
        supervisor: Supervisor,
        commands: CommandResolver,
        policy: Policy,
        clock: Clock,
        events: EventLog,
        agent_env: Mapping[str, str],
        config_dir: Path,
        tracker: ResourceTracker | None = None,
        workers: int = 4,
        scan: Callable[[ProcessOwner], Sequence[NodeProcess]] = scan_node_processes,
        orphans: Callable[..., Sequence[NodeProcess]] = orphaned_node_processes,
        boot_id: str | None = None,
    ) -> None:
        self.owner = owner
        self.node_id = owner.node_id
        self._boot_id = procfs.boot_id() if boot_id is None else boot_id
        self._store = store
        self._supervisor = supervisor
        self._commands = commands
        self._policy = policy
        self._clock = clock
        self.events = events
        self._agent_env = dict(agent_env)
        self._config_dir = config_dir
        self._worker_count = workers
        self._tracker = tracker
        self._scan = scan
        self._orphans = orphans
        self._queue: WorkQueue[AgentId] = WorkQueue()
        self._desired = NodeDesiredState(Generation(0))
        self._specs: dict[AgentId, AgentSpec] = {}
        self._patches: dict[AgentId, AgentSpec] = {}
        # Programs of the stored desired state that this daemon's allow-list (which may
        # have changed while it was down) no longer allows: never started again.
        self._refused_programs: dict[str, str] = {}
        self._overrides: dict[AgentId, OverrideEntry] = {}
        self._records: dict[AgentId, AgentRecord] = {}
        self._handles: dict[AgentId, ProcessHandle] = {}
        self._tokens: dict[AgentId, str] = {}
        # Agents whose live process a previous daemon spawned: its children are not this
        # daemon's, so what it leaves behind is looked for in all of /proc.
        self._adopted: set[AgentId] = set()
        self._unmanaged: dict[AgentId, Heartbeat] = {}
        self._beats: dict[AgentId, _Beat] = {}
        self._causes: dict[AgentId, otel_context.Context] = {}
        # The trace context of each agent's latest ``agent.start`` span: reconcile passes
        # while the agent is Starting (the one that sees its first healthy heartbeat
        # included) continue that trace instead of starting their own.
        self._start_causes: dict[AgentId, otel_context.Context] = {}
        self._pending: set[AgentId] = set()
        self._updating: set[AgentId] = set()
        self._operation_gates: dict[OperationId, _Gate] = {}
        self._observed_generation = Generation(0)
        self._apply_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._processes_dirty = asyncio.Event()
        self._finished_saved: dict[AgentId, tuple[object, ...]] = {}
        self._on_change: list[Callable[[], None]] = []
        self.reconcile_passes = 0
        self.reconcile_seconds = 0.0

    # -- lifecycle ---------------------------------------------------------------

    async def start(self, *, run: bool = True) -> None:
        """Load the durable state, adopt live agents, and (``run``) start the workers.

        With ``run=False`` the caller starts them with ``run`` once the rest of the
        daemon is up (``DaemonApp`` does, after its servers started).
        """
        self._supervisor.set_exit_callback(self._on_process_exit)
        loaded = self._store.load()
        if loaded.corrupt is not None:
            log.error(
                "the desired state file was unusable (%s); moved aside to %s; "
                "starting from an empty desired state until the Manager sends one",
                loaded.corrupt.reason,
                loaded.corrupt.moved_to,
            )
        self._set_desired(loaded.state)
        self._overrides = self._store.load_overrides()
        patches = self._store.load_patches()
        if patches.generation == self._desired.generation:  # else a newer one replaced them
            self._patches = {a: spec for a, spec in patches.specs.items() if a in self._specs}
        self._check_stored_commands()
        self._adopt(self._store.load_processes())
        self._restore_finished(self._store.load_finished())
        await self._stop_unrecorded()
        if run:
            self.run()

    def _check_stored_commands(self) -> None:
        """Check the stored specs' programs against the allow-list of this start.

        A desired state was checked when it arrived, under the settings of that time;
        one that a narrower ``agents.allowed_commands`` no longer allows is kept (the
        next generation replaces it) but its program is not started again. A process
        already running it is left to run, and named in the log.
        """
        for agent_id in sorted(self._specs):
            spec = self._spec(agent_id)
            if spec is None or not spec.command or spec.command[0] in self._refused_programs:
                continue
            try:
                self._commands.check_allowed(spec.command[0], field=f"{agent_id}.command[0]")
            except InvalidArgument as error:
                self._refused_programs[spec.command[0]] = str(error)
                log.warning(
                    "the stored desired state runs a program this daemon's settings no "
                    "longer allow; it will not be started again: %s",
                    error,
                    extra={"agent_id": agent_id},
                )

    def run(self) -> None:
        """Start reconciling: the workers, the processes file writer, a pass per agent.

        Adopted agents could not be heard while the daemon was away or starting (its
        loop busy, its sockets not yet read), so their heartbeat deadlines start now.
        """
        self._restart_heartbeat_deadlines()
        for _ in range(self._worker_count):
            self._spawn(self._work())
        self._spawn(self._write_processes())
        self._pending = set(self._specs) | set(self._records)
        for agent_id in self._pending:
            self._queue.add(agent_id)
        self._mark_observed()

    async def stop(self, *, stop_agents: bool = False) -> None:
        """Stop the loop; agents keep running unless ``stop_agents``.

        The loop stops first: while it runs, an agent exiting because it was stopped
        here would be restarted by its restart policy, and outlive the daemon.
        """
        self._queue.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if stop_agents:
            await asyncio.gather(*self._stop_all("the daemon is exiting"), return_exceptions=True)
        self._save_processes_now()
        await self._supervisor.close()

    def _stop_all(self, reason: str) -> list[Coroutine[Any, Any, None]]:
        """Stop every live agent, each recorded as stopping for ``reason`` (so its exit
        reads as stopped, not as a crash), unless a stop is already under way."""
        now = self._clock.monotonic()
        stops = []
        for agent_id, handle in list(self._handles.items()):
            action = Stop(grace_s=self._grace(agent_id), reason=reason)
            record = self._records.get(agent_id)
            if record is not None and record.stop is None:
                self._records[agent_id] = apply_stop_requested(record, action, now=now)
            stops.append(self._supervisor.stop(handle, grace_s=action.grace_s))
        return stops

    def set_agent_env(self, name: str, value: str) -> None:
        """Hand ``name=value`` to every agent started from now on (e.g. a bound address)."""
        self._agent_env[name] = value

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (cheaply) after any record changes, e.g. to report upstream."""
        self._on_change.append(callback)

    # -- reading -----------------------------------------------------------------

    @property
    def generation(self) -> Generation:
        return self._desired.generation

    @property
    def observed_generation(self) -> Generation:
        """The newest generation every agent has been reconciled against."""
        return self._observed_generation

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def idle(self) -> bool:
        """No agent waits to be reconciled and no pass runs."""
        return not len(self._queue) and not self._queue.in_flight

    def desired(self) -> NodeDesiredState:
        return self._desired

    def agents(self) -> list[AgentView]:
        """Every agent the node knows, desired or still winding down, sorted by id."""
        ids = sorted(set(self._specs) | set(self._records))
        return [self.agent(agent_id) for agent_id in ids]

    def agent(self, agent_id: AgentId) -> AgentView:
        spec = self._spec(agent_id)
        record = self._current_record(agent_id)
        if spec is None and record is None:
            raise NotFound("agent", agent_id)
        override = self._overrides.get(agent_id)
        return AgentView(
            record=record or AgentRecord(agent_id=agent_id),
            spec=spec,
            override=override.override if override else None,
        )

    def unmanaged(self) -> dict[AgentId, Heartbeat]:
        """Heartbeats from agents this daemon did not start (when allowed)."""
        return dict(self._unmanaged)

    def pids(self) -> dict[AgentId, int]:
        """The live agents' main pids."""
        return {agent_id: h.pid for agent_id, h in self._handles.items()}

    # -- desired state in --------------------------------------------------------

    async def apply(self, offered: NodeDesiredState) -> ApplyOutcome:
        """Validate, persist (durably, before answering) and act on a desired state."""
        validate_node_state(offered)
        resolved = self._resolve_commands(offered)
        async with self._apply_lock:
            current = self._desired
            if resolved.generation < current.generation:
                raise StaleGeneration(offered=resolved.generation, current=current.generation)
            if resolved.generation == current.generation:
                if resolved != current:
                    raise Conflict(
                        f"generation {current.generation} was already applied with other content"
                    )
                return ApplyOutcome(generation=current.generation, changed=False)
            await asyncio.to_thread(self._store.save, resolved)
            failpoints.failpoint("controller.after_persist")
            touched = set(self._specs) | self._pending | {spec.id for spec in resolved.agents}
            self._set_desired(resolved)
            self._refused_programs = {}  # every program of ``resolved`` was just checked
            self._pending |= touched
            if self._patches:
                self._patches = {}
                await asyncio.to_thread(self._store.save_patches, Patches(resolved.generation))
            if self._overrides:
                self._overrides = {}
                await asyncio.to_thread(self._store.save_overrides, {})
        self.events.emit(
            EventType.SPEC_APPLIED,
            reason="SyncAgentStates",
            message=f"generation {resolved.generation} with {len(resolved.agents)} agents",
        )
        ctx = otel_context.get_current()
        for agent_id in touched:
            self._causes[agent_id] = ctx
            self._queue.add(agent_id)
        self._mark_observed()
        return ApplyOutcome(generation=resolved.generation, changed=True)

    def _resolve_commands(self, state: NodeDesiredState) -> NodeDesiredState:
        # A program that a thousand agents share is looked up and checked once.
        checked: dict[str, str] = {}
        specs = []
        for i, spec in enumerate(state.agents):
            path = checked.get(spec.command[0]) if spec.command else None
            if path is None:
                command = self._commands.resolve(spec.command, field=f"agents[{i}].command")
                checked[spec.command[0]] = command[0]
            else:
                command = (path, *spec.command[1:])
            specs.append(replace(spec, command=command))
        return NodeDesiredState(state.generation, tuple(specs))

    def _set_desired(self, state: NodeDesiredState) -> None:
        self._desired = state
        self._specs = state.by_id()

    # -- operations --------------------------------------------------------------

    async def operate(
        self, agent_id: AgentId, operation: str, *, operation_id: str = ""
    ) -> OperationOutcome:
        """Start, stop (local overrides, persisted) or restart (once) an agent.

        Calls sharing an operation id run one at a time, so a retry arriving while the
        first call is still remembering its result answers as a duplicate instead of
        acting again.
        """
        if operation not in Operation.ALL:
            raise InvalidArgument("operation", f"must be one of {sorted(Operation.ALL)}")
        return await self._one_at_a_time(
            operation_id, lambda: self._operate_once(agent_id, operation, operation_id)
        )

    async def _one_at_a_time(self, operation_id: str, call: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``call`` after every earlier call with the same operation id finished."""
        if not operation_id:
            return await call()
        gate = self._operation_gates.setdefault(OperationId(operation_id), _Gate())
        gate.users += 1
        try:
            async with gate.lock:
                return await call()
        finally:
            gate.users -= 1
            if not gate.users:
                del self._operation_gates[OperationId(operation_id)]

    async def _operate_once(
        self, agent_id: AgentId, operation: str, operation_id: str
    ) -> OperationOutcome:
        if operation_id:
            previous = self._store.lookup_operation(OperationId(operation_id))
            if previous is not None:
                if previous.agent_id != agent_id or previous.action != operation:
                    raise InvalidArgument(
                        "operation_id", "already used for another agent or operation"
                    )
                return OperationOutcome(agent_id, operation, previous.message, duplicate=True)
        if agent_id not in self._specs:
            raise NotFound("agent", agent_id)
        message = await self._operate(agent_id, operation)
        if operation_id:
            result = OperationResult(
                agent_id=agent_id,
                action=operation,
                success=True,
                message=message,
                at_wall_s=self._clock.wall(),
            )
            await asyncio.to_thread(
                self._store.remember_operation, OperationId(operation_id), result
            )
        self._queue.add(agent_id)
        return OperationOutcome(agent_id, operation, message)

    async def _operate(self, agent_id: AgentId, operation: str) -> str:
        if operation == Operation.RESTART:
            record = self._records.get(agent_id) or AgentRecord(agent_id=agent_id)
            self._records[agent_id] = on_restart_requested(record)
            return "restart requested; backoff cleared"
        override = Override.START if operation == Operation.START else Override.STOP
        self._overrides[agent_id] = OverrideEntry(override, self._desired.generation)
        stopped = self._records.get(agent_id)
        if override is Override.START and stopped is not None and not stopped.alive:
            self._records[agent_id] = on_restart_requested(stopped)
        await asyncio.to_thread(self._store.save_overrides, dict(self._overrides))
        return f"{operation} override set until the next generation"

    def _spec(self, agent_id: AgentId) -> AgentSpec | None:
        return self._patches.get(agent_id) or self._specs.get(agent_id)

    def _effective_spec(self, agent_id: AgentId) -> AgentSpec | None:
        spec = self._spec(agent_id)
        override = self._overrides.get(agent_id)
        if spec is None or override is None:
            return spec
        state = (
            DesiredState.RUNNING if override.override is Override.START else DesiredState.STOPPED
        )
        return replace(spec, state=state)

    # -- rolling updates ------------------------------------------------------------

    async def push_update(
        self,
        agent_id: AgentId,
        *,
        version: str,
        command: tuple[str, ...],
        deadline_s: float,
        operation_id: str = "",
    ) -> UpdateResult:
        """Roll one agent to a new version behind a health gate; roll back on failure.

        The new spec is a local patch over the desired state until the next newer
        generation replaces it. A retry with the same operation id that arrives while
        the rollout runs waits for it and answers with its result.
        """
        return await self._one_at_a_time(
            operation_id,
            lambda: self._push_update_once(
                agent_id,
                version=version,
                command=command,
                deadline_s=deadline_s,
                operation_id=operation_id,
            ),
        )

    async def _push_update_once(
        self,
        agent_id: AgentId,
        *,
        version: str,
        command: tuple[str, ...],
        deadline_s: float,
        operation_id: str,
    ) -> UpdateResult:
        if operation_id:
            previous = self._store.lookup_operation(OperationId(operation_id))
            if previous is not None:
                if previous.agent_id != agent_id or previous.action != "update":
                    raise InvalidArgument(
                        "operation_id", "already used for another agent or operation"
                    )
                return replace(_result_from_json(previous.message), duplicate=True)
        current = self._spec(agent_id)
        effective = self._effective_spec(agent_id)
        if current is None or effective is None:
            raise NotFound("agent", agent_id)
        if effective.state is not DesiredState.RUNNING:
            raise Conflict(f"agent {agent_id!r} is not desired running")
        if agent_id in self._updating:
            raise Conflict(f"another update of agent {agent_id!r} is in progress")
        new_command = self._commands.resolve(command, field="command") if command else None
        target = replace(current, version=version, command=new_command or current.command)
        _validate_update(target)
        self._updating.add(agent_id)
        try:
            result = await self._roll(agent_id, current, target, deadline_s=deadline_s)
        finally:
            self._updating.discard(agent_id)
        if operation_id:
            entry = OperationResult(
                agent_id=agent_id,
                action="update",
                success=result.outcome in (UpdateOutcome.SUCCEEDED, UpdateOutcome.UNCHANGED),
                message=_result_to_json(result),
                at_wall_s=self._clock.wall(),
            )
            await asyncio.to_thread(
                self._store.remember_operation, OperationId(operation_id), entry
            )
        return result

    async def _roll(
        self, agent_id: AgentId, current: AgentSpec, target: AgentSpec, *, deadline_s: float
    ) -> UpdateResult:
        old, new = current.version, target.version
        if target.fingerprint() == current.fingerprint():
            return UpdateResult(UpdateOutcome.UNCHANGED, old, old, "already running this version")
        generation = self.generation
        earlier_patch = self._patches.get(agent_id)  # an update that succeeded before
        self._patches[agent_id] = target
        self._queue.add(agent_id)
        if await self._healthy_within(agent_id, target, deadline_s=deadline_s):
            if self.generation == generation:
                # Kept only once healthy: a daemon that dies during the rollout comes
                # back to the spec before it, and rolls the agent back itself.
                patches = Patches(generation, dict(self._patches))
                await asyncio.to_thread(self._store.save_patches, patches)
            self.events.emit(
                EventType.UPDATE_SUCCEEDED, agent_id=agent_id, message=f"{old} -> {new}"
            )
            return UpdateResult(UpdateOutcome.SUCCEEDED, old, new, f"{new} is healthy")
        if self.generation != generation:
            message = f"superseded by generation {self.generation}"
            return UpdateResult(UpdateOutcome.FAILED, old, new, message)
        if self._patches.get(agent_id) is target:  # back to ``current``, patch or not
            if earlier_patch is None:
                del self._patches[agent_id]
            else:
                self._patches[agent_id] = earlier_patch
        record = self._records.get(agent_id)
        if record is not None:
            # The crashes and starts were the new version's: the previous one starts
            # at once, not after the backoff or burst guard they earned.
            self._records[agent_id] = on_restart_requested(record)
        self._queue.add(agent_id)
        reason = f"{new} not healthy within {deadline_s:g}s; rolled back to {old}"
        self.events.emit(EventType.UPDATE_ROLLED_BACK, agent_id=agent_id, message=reason)
        if await self._healthy_within(agent_id, current, deadline_s=deadline_s):
            return UpdateResult(UpdateOutcome.ROLLED_BACK, old, old, reason)
        return UpdateResult(
            UpdateOutcome.FAILED, old, old, f"{reason}, which is not healthy either"
        )

    async def _healthy_within(
        self, agent_id: AgentId, spec: AgentSpec, *, deadline_s: float
    ) -> bool:
        """Wait until the agent runs ``spec`` and is healthy, for at most ``deadline_s``.

        An agent with heartbeats is healthy at its first healthy heartbeat; one without
        must stay up for a quarter of the deadline (at most 2 s) to count.
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        settle_s = 0.0 if spec.heartbeat else min(2.0, deadline_s / 4)
        while loop.time() < end:
            record = self._records.get(agent_id)
            now = self._clock.monotonic()
            if (
                record is not None
                and record.phase is Phase.RUNNING
                and record.running_fingerprint == spec.fingerprint()
                and record.started_at_s is not None
                and now - record.started_at_s >= settle_s
            ):
                return True
            await asyncio.sleep(0.05)
        return False

    # -- heartbeats (the AgentDirectory and HeartbeatSink of the receivers) ------

    def identity(self, agent_id: AgentId) -> AgentIdentity | None:
        if agent_id not in self._specs and agent_id not in self._records:
            return None
        handle = self._handles.get(agent_id)
        return AgentIdentity(
            pid=handle.pid if handle else None, token=self._tokens.get(agent_id, "")
        )

    def record(self, heartbeat: Heartbeat, *, received_at_s: float, transport: str) -> None:
        """Keep the agent's latest heartbeat; wake its reconcile only when it matters.

        This is the hot path (every agent, every interval): it stores the beat beside
        the record, and the record absorbs it when it is next read
        (``_current_record``), so a steady agent costs a dict write per heartbeat.
        """
        agent_id = heartbeat.agent_id
        record = self._records.get(agent_id)
        if record is None:
            self._unmanaged[agent_id] = heartbeat
            return
        previous = self._beats.get(agent_id)
        self._beats[agent_id] = _Beat(heartbeat, received_at_s, self._clock.wall())
        if (
            previous is None
            or record.phase is not Phase.RUNNING
            or previous.heartbeat.status != heartbeat.status
        ):
            self._queue.add(agent_id)

    def _current_record(self, agent_id: AgentId) -> AgentRecord | None:
        """The record with its latest heartbeat absorbed (and stored back)."""
        record = self._records.get(agent_id)
        beat = self._beats.get(agent_id)
        if record is None or beat is None or not record.alive:
            return record
        if record.last_heartbeat_s is not None and beat.received_at_s <= record.last_heartbeat_s:
            return record
        record = on_heartbeat(
            record, beat.heartbeat, now=beat.received_at_s, wall_now=beat.received_wall_s
        )
        self._records[agent_id] = record
        return record

    def record_samples(self, samples: Mapping[AgentId, tuple[float, int]]) -> None:
        """Resource samples from the monitor: (cpu percent, memory bytes) per agent."""
        for agent_id, (cpu, memory) in samples.items():
            record = self._records.get(agent_id)
            if record is not None and record.alive:
                self._records[agent_id] = on_sample(record, cpu_percent=cpu, memory_bytes=memory)

    # -- the loop ----------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            agent_id = await self._queue.get()
            try:
                await self._reconcile(agent_id)
                self._queue.forget(agent_id)
            except Exception:
                delay = self._queue.add_rate_limited(agent_id)
                log.exception(
                    "reconcile failed; retrying in %.2fs", delay, extra={"agent_id": agent_id}
                )
            finally:
                self._queue.done(agent_id)

    async def _reconcile(self, agent_id: AgentId) -> None:
        started = self._clock.monotonic()
        generation = self._desired.generation
        spec = self._effective_spec(agent_id)
        record = self._current_record(agent_id)
        if record is None:
            if spec is None:
                self._acted(agent_id, generation)
                return
            record = AgentRecord(agent_id=agent_id)
        cause = self._causes.pop(agent_id, None)
        if cause is None and record.phase is Phase.STARTING:
            cause = self._start_causes.get(agent_id)
        with tracer.start_as_current_span(
            "reconcile", context=cause, attributes={"agent.id": agent_id}
        ):
            decision = reconcile(spec, record, started, self._policy)
            failpoints.failpoint("reconcile.mid_pass")
            for action in decision.actions:
                await self._execute(agent_id, action)
        if decision.requeue_after_s is not None:
            self._queue.add_after(agent_id, decision.requeue_after_s)
        self._acted(agent_id, generation)
        self.reconcile_passes += 1
        self.reconcile_seconds += self._clock.monotonic() - started
        if decision.actions:
            self._changed()

    def _acted(self, agent_id: AgentId, generation: Generation) -> None:
        """A pass that read ``generation`` is done; it counts only if that is still current."""
        if agent_id in self._pending and generation == self._desired.generation:
            self._pending.discard(agent_id)
            self._mark_observed()

    def _mark_observed(self) -> None:
        if not self._pending and self._observed_generation != self._desired.generation:
            self._observed_generation = self._desired.generation
            self._changed()  # a report tells the Manager, with the states it was reached in

    async def _execute(self, agent_id: AgentId, action: Action) -> None:
        now = self._clock.monotonic()
        record = self._records.get(agent_id) or AgentRecord(agent_id=agent_id)
        match action:
            case Start():
                await self._start(record, action)
            case Stop():
                self._stop(record, action, now=now)
            case SetPhase():
                self._records[agent_id] = apply_phase(record, action, now=now)
                self._phase_event(record, action)
            case EnterBackoff():
                self._records[agent_id] = apply_backoff(record, action)
                self.events.emit(
                    EventType.AGENT_BACKOFF,
                    agent_id=agent_id,
                    reason="BackOff",
                    message=f"next start in {action.backoff.delay_s:.1f}s: {action.backoff.reason}",
                )
            case ResetFailures():
                self._records[agent_id] = apply_reset_failures(record, action)
            case Forget():
                self._forget(agent_id)

    def _phase_event(self, before: AgentRecord, action: SetPhase) -> None:
        agent_id = before.agent_id
        if action.phase is Phase.RUNNING and before.phase is Phase.STARTING:
            span = trace.get_current_span()
            span.add_event("agent.first_healthy_heartbeat", {"agent.id": agent_id})
            self.events.emit(EventType.AGENT_HEALTHY, agent_id=agent_id, reason="FirstHeartbeat")
        elif action.phase is Phase.DEGRADED and before.phase is not Phase.DEGRADED:
            self.events.emit(
                EventType.AGENT_UNHEALTHY,
                agent_id=agent_id,
                reason="Degraded",
                message=action.message,
            )

    async def _start(self, record: AgentRecord, action: Start) -> None:
        spec = action.spec
        agent_id = spec.id
        token = self._tokens.setdefault(agent_id, secrets.token_urlsafe(24))
        if record.last_exit is not None:
            await self._stop_leftovers(agent_id, everywhere=agent_id in self._adopted)
        with tracer.start_as_current_span("agent.start", attributes={"agent.id": agent_id}):
            self._start_causes[agent_id] = otel_context.get_current()
            env = self._spawn_env(spec, token)
            try:
                refused = self._refused_programs.get(spec.command[0]) if spec.command else None
                if refused is not None:
                    raise SpawnError(refused)
                handle = await self._supervisor.start(spec, env=env)
            except SpawnError as error:
                now = self._clock.monotonic()
                exit_info = ExitInfo(code=None, signal=None, at_s=now, spawn_error=str(error))
                self._records[agent_id] = on_exit(
                    record, exit_info, spec=spec, now=now, policy=self._policy
                )
                self.events.emit(
                    EventType.AGENT_EXITED,
                    agent_id=agent_id,
                    reason="SpawnFailed",
                    message=str(error),
                )
                self._queue.add(agent_id)
                return
        failpoints.failpoint("supervisor.after_spawn_before_record")
        self._handles[agent_id] = handle
        self._adopted.discard(agent_id)
        self._beats.pop(agent_id, None)
        self._records[agent_id] = on_started(
            record,
            spec,
            pid=handle.pid,
            start_ticks=handle.start_ticks,
            now=self._clock.monotonic(),
            policy=self._policy,
        )
        self._processes_dirty.set()
        if self._tracker is not None:
            self._tracker.track(agent_id, handle.pid, start_ticks=handle.start_ticks)
        self.events.emit(
            EventType.AGENT_STARTED,
            agent_id=agent_id,
            reason="Started",
            message=f"pid {handle.pid}: {action.reason}",
        )
        if spec.heartbeat is not None:
            self._queue.add_after(agent_id, spec.heartbeat.timeout_s)

    async def _stop_leftovers(self, agent_id: AgentId, *, everywhere: bool) -> None:
        """Stop what an earlier instance of ``agent_id`` left running, before starting anew.

        An agent that forks and exits leaves its children behind: in its old session,
        in sessions of their own, and (after a daemon restart) parented by init, where
        no stop of a later instance looks. They still carry the agent's id and the
        ``owner`` marks in their environment, so they are found in /proc and stopped
        here, and a new instance never runs beside its predecessor's remains. While the
        daemon runs, they are its own children (it is their subreaper), so only those
        are read: a few reads on the loop, and only when an agent starts again after an
        exit. What an agent left while the daemon was away is stopped by the full scan
        at start; an adopted agent (``everywhere``) was spawned by an earlier daemon, so
        its children went to init and the whole of /proc is scanned, off the loop.

        A leftover may exec while it is being found (its command line then no longer
        matches the scan, and adoption refuses it), so the scan repeats until it finds
        nothing, a few rounds at most.
        """
        grace_s = self._stray_grace(agent_id)
        for _ in range(_LEFTOVER_ROUNDS):
            live = {handle.pid for handle in self._handles.values()}
            if everywhere:
                every = await asyncio.to_thread(self._scan, self.owner)
                candidates = [p for p in every if p.pid not in live]
            else:
                candidates = list(self._orphans(self.owner, exclude=live))
            found = [p for p in candidates if p.agent_id == agent_id]
            if not found:
                return
            leftovers = [
                handle
                for p in found
                if (
                    handle := self._supervisor.adopt(
                        agent_id, pid=p.pid, start_ticks=p.start_ticks, cmdline=p.cmdline
                    )
                )
                is not None
            ]
            log.info(
                "stopping %d processes an earlier instance left behind",
                len(leftovers),
                extra={"agent_id": agent_id},
            )
            await asyncio.gather(
                *(self._supervisor.stop(h, grace_s=grace_s) for h in leftovers),
                return_exceptions=True,
            )

    def _spawn_env(self, spec: AgentSpec, token: str) -> dict[str, str]:
        env = dict(self._agent_env)
        env["RECONCILER_AGENT_ID"] = spec.id
        env["RECONCILER_AGENT_TOKEN"] = token
        env["RECONCILER_AGENT_VERSION"] = spec.version
        env.update(self.owner.environment())
        if spec.heartbeat is not None:
            env["RECONCILER_HEARTBEAT_INTERVAL_S"] = repr(spec.heartbeat.interval_s)
        if spec.config:
            env[AGENT_CONFIG_FILE_ENV] = str(self._write_agent_config(spec))
        propagate.inject(env)
        env["TRACEPARENT"] = env.pop("traceparent", "")
        if not env["TRACEPARENT"]:
            del env["TRACEPARENT"]
        return env

    def _write_agent_config(self, spec: AgentSpec) -> Path:
        self._config_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._config_dir / f"{spec.id}.json"
        tmp = path.with_suffix(".json.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(tmp, flags | os.O_NONBLOCK, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(dict(spec.config), out, sort_keys=True)
        tmp.replace(path)
        return path

    def _stop(self, record: AgentRecord, action: Stop, *, now: float) -> None:
        agent_id = record.agent_id
        handle = self._handles.get(agent_id)
        if handle is None:
            return
        self._records[agent_id] = apply_stop_requested(record, action, now=now)
        self._spawn(self._stop_process(handle, action.grace_s))

    async def _stop_process(self, handle: ProcessHandle, grace_s: float) -> None:
        with tracer.start_as_current_span("agent.stop", attributes={"agent.id": handle.agent_id}):
            await self._supervisor.stop(handle, grace_s=grace_s)

    def _forget(self, agent_id: AgentId) -> None:
        if self._records.pop(agent_id, None) is not None:
            self._processes_dirty.set()  # it may leave finished.json
        self._adopted.discard(agent_id)
        self._beats.pop(agent_id, None)
        if self._tracker is not None:
            self._tracker.forget(agent_id)
        self._tokens.pop(agent_id, None)
        self._causes.pop(agent_id, None)
        self._start_causes.pop(agent_id, None)
        with contextlib.suppress(FileNotFoundError):
            (self._config_dir / f"{agent_id}.json").unlink()

    def _on_process_exit(self, handle: ProcessHandle, exit_info: ExitInfo) -> None:
        agent_id = handle.agent_id
        current = self._handles.get(agent_id)
        record = self._records.get(agent_id)
        if current is None or current.pid != handle.pid or record is None:
            return
        del self._handles[agent_id]
        self._beats.pop(agent_id, None)
        spec = self._effective_spec(agent_id)
        updated = on_exit(record, exit_info, spec=spec, now=exit_info.at_s, policy=self._policy)
        self._records[agent_id] = updated
        self._processes_dirty.set()
        if self._tracker is not None:
            self._tracker.untrack(agent_id)
        self._exit_event(record, updated, exit_info)
        self._queue.add(agent_id)
        self._changed()

    def _exit_event(self, before: AgentRecord, after: AgentRecord, exit_info: ExitInfo) -> None:
        agent_id = after.agent_id
        if before.stop is not None and not before.stop.failure:
            self.events.emit(
                EventType.AGENT_STOPPED,
                agent_id=agent_id,
                reason="Stopped",
                message=before.stop.reason,
            )
            return
        self.events.emit(
            EventType.AGENT_EXITED, agent_id=agent_id, reason="Exited", message=exit_info.describe()
        )
        if after.phase is Phase.BACKOFF and after.backoff is not None:
            self.events.emit(
                EventType.AGENT_BACKOFF,
                agent_id=agent_id,
                reason="CrashLoop" if after.backoff.delay_s else "Restarting",
                message=f"next start in {after.backoff.delay_s:.1f}s",
            )
        elif after.phase is Phase.FAILED:
            self.events.emit(EventType.AGENT_FAILED, agent_id=agent_id, message=after.message)

    # -- adoption and the processes file -----------------------------------------

    def _adopt(self, processes: Mapping[AgentId, ProcessEntry]) -> None:
        now = self._clock.monotonic()
        for agent_id, saved in processes.items():
            if saved.boot_id and saved.boot_id != self._boot_id:
                log.info(
                    "not adopting pid %d: recorded before the node rebooted",
                    saved.pid,
                    extra={"agent_id": agent_id},
                )
                continue
            handle = self._supervisor.adopt(
                agent_id, pid=saved.pid, start_ticks=saved.start_ticks, cmdline=saved.cmdline
            )
            if handle is None:
                log.info("agent exited while the daemon was away", extra={"agent_id": agent_id})
                continue
            spec = self._specs.get(agent_id)
            heartbeat = spec.heartbeat if spec else None
            self._handles[agent_id] = handle
            self._adopted.add(agent_id)
            self._tokens[agent_id] = saved.token
            started = now - max(0.0, self._clock.wall() - saved.started_at_wall_s)
            if self._tracker is not None:
                self._tracker.track(agent_id, handle.pid, start_ticks=handle.start_ticks)
            self._records[agent_id] = AgentRecord(
                agent_id=agent_id,
                phase=Phase.RUNNING,
                pid=handle.pid,
                process_start_ticks=handle.start_ticks,
                started_at_s=started,
                running_fingerprint=saved.fingerprint,
                stop_grace_s=spec.stop_grace_period_s if spec else 10.0,
                healthy_since_s=now,
                last_heartbeat_s=now if heartbeat else None,
                message="adopted after a daemon restart",
            )
            self.events.emit(
                EventType.AGENT_ADOPTED,
                agent_id=agent_id,
                reason="Adopted",
                message=f"pid {handle.pid}",
            )

    def _restore_finished(self, finished: Mapping[AgentId, FinishedEntry]) -> None:
        """Agents that ended for good before the restart stay down while their spec does."""
        wall, now = self._clock.wall(), self._clock.monotonic()
        for agent_id, entry in finished.items():
            spec = self._effective_spec(agent_id)
            if (
                entry.boot_id != self._boot_id
                or agent_id in self._handles
                or spec is None
                or spec.fingerprint() != entry.fingerprint
            ):
                continue
            exited = now - max(0.0, wall - entry.exited_at_wall_s)
            self._records[agent_id] = AgentRecord(
                agent_id=agent_id,
                phase=Phase.FAILED if entry.failed else Phase.STOPPED,
                last_exit=ExitInfo(code=entry.exit_code, signal=entry.signal, at_s=exited),
                finished_fingerprint=entry.fingerprint,
                message=entry.message,
            )
            self._finished_saved[agent_id] = _finished_key(entry)

    def _restart_heartbeat_deadlines(self) -> None:
        now = self._clock.monotonic()
        for agent_id, record in self._records.items():
            if record.alive and record.last_heartbeat_s is not None:
                self._records[agent_id] = replace(
                    record, last_heartbeat_s=max(record.last_heartbeat_s, now)
                )

    async def _stop_unrecorded(self) -> None:
        """Stop agent processes a previous daemon spawned but never recorded.

        A daemon killed between spawning an agent and saving its pid leaves a process
        that adoption cannot know; starting the agent again would run it twice. Such a
        process still carries its agent's id and this daemon's ``owner`` marks (node id
        and state directory) in its environment, so it is found in /proc and stopped
        before any worker starts an agent; another daemon's agents never are. Processes
        of adopted agents (their children and helpers carry the same ids) are left alone.
        """
        found = await asyncio.to_thread(self._scan, self.owner)
        strays = []
        for process in found:
            if process.agent_id in self._handles:
                continue
            handle = self._supervisor.adopt(
                process.agent_id,
                pid=process.pid,
                start_ticks=process.start_ticks,
                cmdline=process.cmdline,
            )
            if handle is not None:
                strays.append(handle)
                self.events.emit(
                    EventType.AGENT_STOPPED,
                    agent_id=process.agent_id,
                    reason="Unrecorded",
                    message=f"pid {process.pid} was started but never recorded; stopping it",
                )
        await asyncio.gather(
            *(self._supervisor.stop(h, grace_s=self._stray_grace(h.agent_id)) for h in strays),
            return_exceptions=True,
        )

    def _stray_grace(self, agent_id: AgentId) -> float:
        spec = self._specs.get(agent_id)
        return spec.stop_grace_period_s if spec else 10.0

    def _process_snapshot(self) -> dict[AgentId, ProcessEntry]:
        wall, mono = self._clock.wall(), self._clock.monotonic()
        snapshot = {}
        for agent_id, handle in self._handles.items():
            record = self._records.get(agent_id)
            started = record.started_at_s if record and record.started_at_s is not None else mono
            snapshot[agent_id] = ProcessEntry(
                pid=handle.pid,
                start_ticks=handle.start_ticks,
                cmdline=handle.cmdline,
                fingerprint=record.running_fingerprint if record else "",
                started_at_wall_s=wall - (mono - started),
                token=self._tokens.get(agent_id, ""),
                boot_id=self._boot_id,
            )
        return snapshot

    def _finished_snapshot(self) -> dict[AgentId, FinishedEntry]:
        wall, mono = self._clock.wall(), self._clock.monotonic()
        return {
            agent_id: FinishedEntry(
                fingerprint=record.finished_fingerprint,
                failed=record.phase is Phase.FAILED,
                exit_code=record.last_exit.code,
                signal=record.last_exit.signal,
                exited_at_wall_s=wall - (mono - record.last_exit.at_s),
                message=record.message,
                boot_id=self._boot_id,
            )
            for agent_id, record in self._records.items()
            if record.finished_fingerprint and not record.alive and record.last_exit is not None
        }

    async def _write_processes(self) -> None:
        """The one writer of processes.json and finished.json: coalesces bursts of starts
        and exits into few writes; finished.json only when an agent ended for good or
        left that state."""
        while True:
            await self._processes_dirty.wait()
            self._processes_dirty.clear()
            snapshot = self._process_snapshot()
            finished = self._finished_snapshot()
            keys = {agent_id: _finished_key(entry) for agent_id, entry in finished.items()}
            try:
                await asyncio.to_thread(self._store.save_processes, snapshot)
                if keys != self._finished_saved:
                    await asyncio.to_thread(self._store.save_finished, finished)
                    self._finished_saved = keys
            except OSError:
                log.exception("could not save the process list; retrying")
                self._processes_dirty.set()
                await asyncio.sleep(1.0)

    def _save_processes_now(self) -> None:
        try:
            self._store.save_processes(self._process_snapshot())
            self._store.save_finished(self._finished_snapshot())
        except OSError:
            log.exception("could not save the process list at shutdown")

    # -- helpers -----------------------------------------------------------------

    def _grace(self, agent_id: AgentId) -> float:
        record = self._records.get(agent_id)
        return record.stop_grace_s if record else 10.0

    def _changed(self) -> None:
        for callback in self._on_change:
            callback()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _finished_key(entry: FinishedEntry) -> tuple[object, ...]:
    """What tells two records of an ending apart (its wall time moves with clock reads)."""
    return (entry.fingerprint, entry.failed, entry.exit_code, entry.signal, entry.message)


def _validate_update(target: AgentSpec) -> None:
    """Check an updated spec as a whole; errors name the request's field (``version``...)."""
    try:
        validate_spec(target, path="update")
    except InvalidArgument as error:
        raise InvalidArgument(error.field.removeprefix("update."), error.reason) from None


def _result_to_json(result: UpdateResult) -> str:
    return json.dumps(
        {
            "outcome": str(result.outcome),
            "previous_version": result.previous_version,
            "current_version": result.current_version,
            "message": result.message,
        }
    )


def _result_from_json(text: str) -> UpdateResult:
    data = json.loads(text)
    return UpdateResult(
        outcome=UpdateOutcome(data["outcome"]),
        previous_version=data["previous_version"],
        current_version=data["current_version"],
        message=data["message"],
    )
