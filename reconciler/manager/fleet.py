"""FleetService: what operators and the CLI call, and the one writer of desired state.

``FleetChanges`` turns an applied or deleted AgentSet (or a node registering) into new
desired states: it reads the stored sets and nodes, asks ``plan.plan`` what changes,
writes the AgentSet and every changed node's desired state in one ``store.apply``
transaction, records an event and asks the ``Pusher`` to push the changed nodes.
Changes are serialised in this process by a lock and across Manager replicas by the
store (a stale revision or generation raises ``Conflict``: the change is planned
again from fresh data, a few times). Applying what is already stored writes nothing.

``FleetServicer`` is the thin gRPC face: check, call, convert. ``OperateAgent`` and
``GetAgentMetrics`` are proxied to the node's DaemonService with a deadline; the
daemon's error status is relayed (``rpc.ErrorInterceptor``). When a node cannot be
called (no address, or unreachable) ``GetAgentMetrics`` answers from the samples the
node reported. ``WatchEvents`` replays stored events, then follows new ones: woken at
once by events this process stores, and polling for those other replicas store. Its
initial metadata ``reconciler-replay-count`` says how many events the replay holds,
so a client that only lists events knows when it has them all.

With TLS on, only operator certificates may call FleetService.

What it does not do: decide placement (``plan.py``), parse YAML (``agentset.py``), or
talk to daemons except through ``push.DaemonChannels``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import grpc

from reconciler.api.agent.v1 import agent_pb2, event_pb2, metrics_pb2, node_pb2
from reconciler.api.fleet.v1 import fleet_pb2, fleet_pb2_grpc
from reconciler.convert import (
    message_from_json,
    message_to_json,
    spec_messages_from_json,
    specs_from_json,
    specs_to_json,
    timestamp,
    wall_seconds,
)
from reconciler.manager.agentset import CheckedAgentSet, check_agent_set, check_labels, check_name
from reconciler.manager.plan import AgentConflict, NodePlan, NodeState, Plan, owners, plan
from reconciler.manager.push import DaemonChannels
from reconciler.manager.records import (
    AgentSetRecord,
    ApplyChange,
    DesiredRecord,
    EventRecord,
    NodeRecord,
)
from reconciler.manager.service import (
    Clock,
    EventLog,
    NodeStatus,
    PushRequester,
    Readiness,
    check_node_id,
    event_record_to_proto,
    node_info,
)
from reconciler.manager.store import ManagerStore
from reconciler.model.errors import (
    Conflict,
    InvalidArgument,
    NotFound,
    ReconcilerError,
    Unavailable,
)
from reconciler.model.events import EventType
from reconciler.model.ids import is_valid_agent_id
from reconciler.model.spec import AgentSpec
from reconciler.tls import PeerRole, require_role

__all__ = [
    "REPLAY_COUNT_KEY",
    "ApplyOutcome",
    "DeleteOutcome",
    "FleetChanges",
    "FleetServicer",
    "NoDaemonAddress",
    "RevisionMismatch",
    "node_change",
]

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

#: Events read from the store per query while streaming.
_EVENT_PAGE: Final = 500
#: Initial metadata of a WatchEvents stream: how many stored events it replays before
#: the new ones, so a client listing events knows when the listing is complete.
REPLAY_COUNT_KEY: Final = "reconciler-replay-count"
_OPERATORS: Final = frozenset({PeerRole.OPERATOR, PeerRole.MANAGER})


class RevisionMismatch(Conflict):
    """``expected_revision`` was given and the stored revision differs (ABORTED)."""

    def __init__(self, name: str, *, expected: int, stored: int | None) -> None:
        now = f"at revision {stored}" if stored is not None else "absent"
        super().__init__(f"AgentSet {name!r} is {now}, not at the expected revision {expected}")


class NoDaemonAddress(Conflict):
    """The node registered no DaemonService address (FAILED_PRECONDITION)."""

    def __init__(self, node_id: str) -> None:
        super().__init__(f"node {node_id!r} has no daemon address; the Manager cannot call it")


class _Raced(Exception):
    """Another writer changed the state between reading and writing: plan again."""


@dataclass(frozen=True, slots=True)
class ApplyOutcome:
    """The AgentSet as stored (or as it would be), the plan, and whether anything
    changed (or would)."""

    agent_set: fleet_pb2.AgentSet
    plan: Plan
    changed: bool


@dataclass(frozen=True, slots=True)
class DeleteOutcome:
    """The plan of a delete and whether something was (or would be) deleted."""

    plan: Plan
    changed: bool


def node_change(node_plan: NodePlan) -> fleet_pb2.NodeChange:
    """The NodeChange message of one node's plan."""
    return fleet_pb2.NodeChange(
        node_id=node_plan.node_id,
        added_agent_ids=list(node_plan.added),
        changed_agent_ids=list(node_plan.changed),
        removed_agent_ids=list(node_plan.removed),
        previous_generation=node_plan.previous_generation,
        generation=node_plan.generation,
    )


def _check_expected(name: str, stored: AgentSetRecord | None, expected: int) -> None:
    if expected and (stored is None or stored.revision != expected):
        raise RevisionMismatch(
            name, expected=expected, stored=stored.revision if stored is not None else None
        )


def _event(kind: EventType, message: str, *, now: float, node_id: str = "") -> EventRecord:
    return EventRecord(0, now, node_id, None, str(kind), str(kind), message)


class FleetChanges:
    """Plans and writes desired-state changes; the only writer of desired state."""

    def __init__(
        self,
        store: ManagerStore,
        *,
        events: EventLog,
        pusher: PushRequester,
        clock: Clock = time.time,
        attempts: int = 5,
        on_desired: Callable[[Sequence[DesiredRecord]], None] | None = None,
    ) -> None:
        self._store = store
        self._on_desired = on_desired
        self._events = events
        self._pusher = pusher
        self._clock = clock
        self._attempts = attempts
        self._lock = asyncio.Lock()
        self._sets: dict[str, tuple[int, CheckedAgentSet]] = {}
        self._agents: dict[str, tuple[int, tuple[AgentSpec, ...]]] = {}

    # -- reading -------------------------------------------------------------------

    def checked(self, record: AgentSetRecord) -> CheckedAgentSet:
        """The validated form of a stored AgentSet (cached by revision)."""
        cached = self._sets.get(record.name)
        if cached is not None and cached[0] == record.revision:
            return cached[1]
        message = message_from_json(record.document, fleet_pb2.AgentSet, path=record.name)
        try:
            checked = check_agent_set(message)
        except InvalidArgument as error:
            raise ReconcilerError(f"stored AgentSet {record.name!r} is invalid: {error}") from None
        self._sets[record.name] = (record.revision, checked)
        return checked

    def message_of(self, record: AgentSetRecord) -> fleet_pb2.AgentSet:
        """The AgentSet message of a stored record, with its bookkeeping."""
        message = fleet_pb2.AgentSet()
        message.CopyFrom(self.checked(record).message)
        message.metadata.revision = record.revision
        message.metadata.created_at.CopyFrom(timestamp(record.created_at))
        message.metadata.updated_at.CopyFrom(timestamp(record.updated_at))
        return message

    async def definitions(self) -> list[CheckedAgentSet]:
        """Every stored AgentSet, validated, sorted by name."""
        return [self.checked(record) for record in await self._store.list_agent_sets()]

    def agents_of(self, desired: DesiredRecord | None) -> tuple[AgentSpec, ...]:
        """The specs of a stored desired state (cached by generation)."""
        if desired is None:
            return ()
        cached = self._agents.get(desired.node_id)
        if cached is not None and cached[0] == desired.generation:
            return cached[1]
        agents = specs_from_json(desired.agents)
        self._agents[desired.node_id] = (desired.generation, agents)
        return agents

    def _state(self, node: NodeRecord, desired: DesiredRecord | None) -> NodeState:
        return NodeState(
            node_id=node.node_id,
            labels=node.labels,
            generation=desired.generation if desired is not None else 0,
            agents=self.agents_of(desired),
            held_generation=node.current_generation,
        )

    async def _read_state(self) -> tuple[list[NodeState], dict[str, AgentSetRecord]]:
        """The nodes with their desired states, then the AgentSets, in that order.

        The reads are not one transaction. Reading desired states first means a change
        another replica commits in between shows up as newer AgentSets beside older
        desired states: our plan then offers generations that are no longer new, and
        the store refuses the write (we plan again) instead of letting us overwrite
        that change with a plan that never saw it.
        """
        nodes = await self._node_states()
        records = {record.name: record for record in await self._store.list_agent_sets()}
        return nodes, records

    async def _node_states(self) -> list[NodeState]:
        desired = {d.node_id: d for d in await self._store.list_desired()}
        nodes = await self._store.list_nodes()
        return [self._state(node, desired.get(node.node_id)) for node in nodes]

    # -- writing -------------------------------------------------------------------

    async def apply(
        self, checked: CheckedAgentSet, *, dry_run: bool = False, expected_revision: int = 0
    ) -> ApplyOutcome:
        """Store ``checked`` and the desired states it changes (or, dry, say what
        would change). Raises AgentConflict, RevisionMismatch or Unavailable."""
        async with self._lock:
            for _ in range(self._attempts):
                try:
                    return await self._apply_once(checked, dry_run, expected_revision)
                except _Raced:
                    continue
        raise Unavailable(f"AgentSet {checked.name!r} kept changing concurrently; retry")

    async def _apply_once(
        self, checked: CheckedAgentSet, dry_run: bool, expected_revision: int
    ) -> ApplyOutcome:
        name = checked.name
        nodes, records = await self._read_state()
        stored = records.get(name)
        _check_expected(name, stored, expected_revision)
        others = [self.checked(r).definition for r in records.values() if r.name != name]
        result = plan([*others, checked.definition], nodes, focus=name)
        same = stored is not None and self.checked(stored).message == checked.message
        record = self._next_record(checked, stored, same=same)
        outcome = ApplyOutcome(self.message_of(record), result, not same or result.changed)
        if dry_run or not outcome.changed:
            return outcome
        change = ApplyChange(
            agent_set=None if same else record,
            expected_revision=None if same or stored is None else stored.revision,
            desired=self._desired_records(result),
        )
        await self._write(change)
        message = f"AgentSet {name} applied at revision {record.revision}"
        await self._after(result, _event(EventType.AGENT_SET_APPLIED, message, now=self._clock()))
        return outcome

    def _next_record(
        self, checked: CheckedAgentSet, stored: AgentSetRecord | None, *, same: bool
    ) -> AgentSetRecord:
        if stored is not None and same:
            return stored
        now = self._clock()
        record = AgentSetRecord(
            name=checked.name,
            revision=stored.revision + 1 if stored is not None else 1,
            document=message_to_json(checked.message),
            created_at=stored.created_at if stored is not None else now,
            updated_at=now,
        )
        self._sets[record.name] = (record.revision, checked)
        return record

    async def delete(
        self, name: str, *, dry_run: bool = False, expected_revision: int = 0
    ) -> DeleteOutcome:
        """Delete the AgentSet ``name``; its agents leave the nodes it selected.
        Raises NotFound, RevisionMismatch or Unavailable."""
        async with self._lock:
            for _ in range(self._attempts):
                try:
                    return await self._delete_once(name, dry_run, expected_revision)
                except _Raced:
                    continue
        raise Unavailable(f"AgentSet {name!r} kept changing concurrently; retry")

    async def _delete_once(self, name: str, dry_run: bool, expected_revision: int) -> DeleteOutcome:
        nodes, records = await self._read_state()
        stored = records.get(name)
        if stored is None:
            raise NotFound("AgentSet", name)
        _check_expected(name, stored, expected_revision)
        others = [self.checked(r).definition for r in records.values() if r.name != name]
        result = plan(others, nodes, focus=name)
        if dry_run:
            return DeleteOutcome(result, True)
        change = ApplyChange(
            delete_name=name,
            expected_revision=stored.revision,
            desired=self._desired_records(result),
        )
        await self._write(change)
        message = f"AgentSet {name} deleted (was at revision {stored.revision})"
        await self._after(result, _event(EventType.AGENT_SET_DELETED, message, now=self._clock()))
        return DeleteOutcome(result, True)

    async def replan_node(self, node_id: str) -> int:
        """Recompute one node's desired state (at registration); its generation after.
        A conflict between sets on this node keeps its stored state and is logged."""
        async with self._lock:
            for _ in range(self._attempts):
                try:
                    return await self._replan_once(node_id)
                except _Raced:
                    continue
        desired = await self._store.get_desired(node_id)
        return desired.generation if desired is not None else 0

    async def _replan_once(self, node_id: str) -> int:
        node = await self._store.get_node(node_id)
        if node is None:
            return 0
        state = self._state(node, await self._store.get_desired(node_id))
        try:
            result = plan([d.definition for d in await self.definitions()], [state])
        except AgentConflict as conflict:
            log.warning("node %s keeps its desired state: %s", node_id, conflict)
            return state.generation
        if not result.changed:
            return state.generation
        await self._write(ApplyChange(desired=self._desired_records(result)))
        self._pusher.request([node_id])
        return result.nodes[0].generation

    def _desired_records(self, result: Plan) -> tuple[DesiredRecord, ...]:
        now = self._clock()
        return tuple(
            DesiredRecord(n.node_id, n.generation, specs_to_json(n.agents), now)
            for n in result.nodes
        )

    async def _write(self, change: ApplyChange) -> None:
        try:
            await self._store.apply(change)
        except RevisionMismatch:
            raise
        except Conflict as error:
            log.info("concurrent change, planning again: %s", error)
            raise _Raced from error
        if self._on_desired is not None:
            self._on_desired(change.desired)

    async def _after(self, result: Plan, event: EventRecord) -> None:
        for conflict in result.conflicts:
            log.warning("left unchanged: %s", conflict)
        try:
            await self._events.add([event])
        except Unavailable:
            log.warning("could not record event: %s", event.message)
        self._pusher.request(n.node_id for n in result.nodes)


# ------------------------------------------------------------------------ servicer


def _check_agent_id(agent_id: str, path: str) -> str:
    if not is_valid_agent_id(agent_id):
        raise InvalidArgument(path, f"{agent_id[:64]!r} is not a valid agent id")
    return agent_id


def _labels_match(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


class FleetServicer(fleet_pb2_grpc.FleetServiceServicer):
    """FleetService over the store, ``FleetChanges`` and the daemons' channels."""

    def __init__(
        self,
        store: ManagerStore,
        *,
        changes: FleetChanges,
        channels: DaemonChannels,
        events: EventLog,
        readiness: Readiness,
        call_timeout_s: float,
        tls_enabled: bool = False,
        poll_interval_s: float = 1.0,
        clock: Clock = time.time,
    ) -> None:
        self._store = store
        self._changes = changes
        self._channels = channels
        self._events = events
        self._readiness = readiness
        self._call_timeout_s = call_timeout_s
        self._tls_enabled = tls_enabled
        self._poll_interval_s = poll_interval_s
        self._clock = clock
        self._closing = asyncio.Event()

    def close(self) -> None:
        """End every WatchEvents stream (UNAVAILABLE: the Manager is stopping)."""
        self._closing.set()

    def _guard(self, context: Context) -> None:
        require_role(context, _OPERATORS, tls_enabled=self._tls_enabled)

    # -- AgentSets -----------------------------------------------------------------

    async def ApplyAgentSet(
        self, request: fleet_pb2.ApplyAgentSetRequest, context: Context
    ) -> fleet_pb2.ApplyAgentSetResponse:
        self._guard(context)
        checked = check_agent_set(request.agent_set)
        try:
            outcome = await self._changes.apply(
                checked, dry_run=request.dry_run, expected_revision=request.expected_revision
            )
        except RevisionMismatch as error:
            await context.abort(grpc.StatusCode.ABORTED, str(error))
        return fleet_pb2.ApplyAgentSetResponse(
            agent_set=outcome.agent_set,
            node_changes=[node_change(n) for n in outcome.plan.nodes],
            changed=outcome.changed,
        )

    async def GetAgentSet(
        self, request: fleet_pb2.GetAgentSetRequest, context: Context
    ) -> fleet_pb2.GetAgentSetResponse:
        self._guard(context)
        name = check_name(request.name, path="name")
        record = await self._store.get_agent_set(name)
        if record is None:
            raise NotFound("AgentSet", name)
        return fleet_pb2.GetAgentSetResponse(agent_set=self._changes.message_of(record))

    async def ListAgentSets(
        self, request: fleet_pb2.ListAgentSetsRequest, context: Context
    ) -> fleet_pb2.ListAgentSetsResponse:
        self._guard(context)
        records = await self._store.list_agent_sets()
        return fleet_pb2.ListAgentSetsResponse(
            agent_sets=[self._changes.message_of(r) for r in sorted(records, key=lambda r: r.name)]
        )

    async def DeleteAgentSet(
        self, request: fleet_pb2.DeleteAgentSetRequest, context: Context
    ) -> fleet_pb2.DeleteAgentSetResponse:
        self._guard(context)
        name = check_name(request.name, path="name")
        try:
            outcome = await self._changes.delete(
                name, dry_run=request.dry_run, expected_revision=request.expected_revision
            )
        except RevisionMismatch as error:
            await context.abort(grpc.StatusCode.ABORTED, str(error))
        return fleet_pb2.DeleteAgentSetResponse(
            node_changes=[node_change(n) for n in outcome.plan.nodes], changed=outcome.changed
        )

    # -- nodes and agents ----------------------------------------------------------

    async def ListNodes(
        self, request: fleet_pb2.ListNodesRequest, context: Context
    ) -> fleet_pb2.ListNodesResponse:
        self._guard(context)
        selector = check_labels(request.label_selector, path="label_selector")
        if request.status not in node_pb2.NodeStatus.values():
            raise InvalidArgument("status", f"unknown node status {request.status}")
        desired = {d.node_id: d for d in await self._store.list_desired()}
        nodes: list[node_pb2.NodeInfo] = []
        for stored in await self._store.list_nodes():
            info, _ = self._node_info(stored, desired.get(stored.node_id))
            if _labels_match(stored.labels, selector) and request.status in (0, info.status):
                nodes.append(info)
        return fleet_pb2.ListNodesResponse(nodes=sorted(nodes, key=lambda n: n.node_id))

    def _node_info(
        self, stored: NodeRecord, desired: DesiredRecord | None
    ) -> tuple[node_pb2.NodeInfo, NodeStatus]:
        """A node as operators see it (the newest heartbeat seen here, its status and
        agent count), and its status."""
        node = self._readiness.latest(stored)
        status = self._readiness.status(node)
        agent_count = len(self._changes.agents_of(desired))
        return node_info(node, status=status, agent_count=agent_count), status

    async def DeleteNode(
        self, request: fleet_pb2.DeleteNodeRequest, context: Context
    ) -> fleet_pb2.DeleteNodeResponse:
        self._guard(context)
        node_id = check_node_id(request.node_id)
        stored = await self._store.get_node(node_id)
        if stored is None:
            raise NotFound("node", node_id)
        info, status = self._node_info(stored, await self._store.get_desired(node_id))
        if not await self._store.delete_node(node_id):
            raise NotFound("node", node_id)  # deleted by another call meanwhile
        await self._channels.forget(node_id)
        message = f"node {node_id} deleted (was {status})"
        await self._events.add(
            [_event(EventType.NODE_DELETED, message, now=self._clock(), node_id=node_id)]
        )
        return fleet_pb2.DeleteNodeResponse(node=info)

    async def ListAgents(
        self, request: fleet_pb2.ListAgentsRequest, context: Context
    ) -> fleet_pb2.ListAgentsResponse:
        self._guard(context)
        only_node = check_node_id(request.node_id) if request.node_id else None
        selector = check_labels(request.label_selector, path="label_selector")
        set_name = check_name(request.agent_set, path="agent_set") if request.agent_set else None
        nodes = await self._store.list_nodes()
        desired = {d.node_id: d for d in await self._store.list_desired()}
        observed: dict[str, dict[str, agent_pb2.AgentInfo]] = {}
        for record in await self._store.list_observed(only_node):
            info = message_from_json(record.info, agent_pb2.AgentInfo, path=record.agent_id)
            observed.setdefault(record.node_id, {})[record.agent_id] = info
        sets = [d.definition for d in await self._changes.definitions()] if set_name else []
        agents: list[agent_pb2.AgentState] = []
        for node in sorted(nodes, key=lambda n: n.node_id):
            if only_node is not None and node.node_id != only_node:
                continue
            specs = {s.id: s for s in spec_messages_from_json(_agents_json(desired, node))}
            placed = _placed(node, sets) if set_name else {}
            status = self._readiness.status(node)
            infos = observed.get(node.node_id, {})
            for agent_id in sorted(set(specs) | set(infos)):
                if set_name is not None and placed.get(agent_id) != set_name:
                    continue
                state = _agent_state(node.node_id, specs.get(agent_id), infos.get(agent_id))
                labels = state.spec.labels if state.HasField("spec") else state.info.labels
                if _labels_match(labels, selector):
                    agents.append(_shown(state, agent_id, status))
        return fleet_pb2.ListAgentsResponse(agents=agents)

    # -- proxied to daemons --------------------------------------------------------

    def _timeout_s(self, context: Context) -> float:
        remaining = context.time_remaining()
        if remaining is None:
            return self._call_timeout_s
        return max(0.001, min(self._call_timeout_s, remaining))

    async def _callable_node(self, node_id: str) -> NodeRecord:
        node = await self._store.get_node(check_node_id(node_id))
        if node is None:
            raise NotFound("node", node_id)
        return node

    async def OperateAgent(
        self, request: fleet_pb2.OperateAgentRequest, context: Context
    ) -> agent_pb2.AgentOperationResponse:
        self._guard(context)
        _check_agent_id(request.request.agent_id, "request.agent_id")
        node = await self._callable_node(request.node_id)
        if not node.daemon_address:
            raise NoDaemonAddress(node.node_id)
        stub = self._channels.stub(node.node_id, node.daemon_address)
        response: agent_pb2.AgentOperationResponse = await stub.OperateAgent(
            request.request, timeout=self._timeout_s(context)
        )
        return response

    async def GetAgentMetrics(
        self, request: fleet_pb2.GetAgentMetricsRequest, context: Context
    ) -> metrics_pb2.AgentMetricsResponse:
        self._guard(context)
        query = request.request
        _check_agent_id(query.agent_id, "request.agent_id")
        if not math.isfinite(query.duration_seconds) or query.duration_seconds < 0:
            raise InvalidArgument("request.duration_seconds", "must be a finite number >= 0")
        node = await self._callable_node(request.node_id)
        if not node.daemon_address:
            return await self._reported_metrics(node.node_id, query, NoDaemonAddress(node.node_id))
        stub = self._channels.stub(node.node_id, node.daemon_address)
        try:
            response: metrics_pb2.AgentMetricsResponse = await stub.GetAgentMetrics(
                query, timeout=self._timeout_s(context)
            )
        except grpc.aio.AioRpcError as error:
            unreachable = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            if error.code() not in unreachable:
                raise
            return await self._reported_metrics(node.node_id, query, error)
        return response

    async def _reported_metrics(
        self, node_id: str, query: metrics_pb2.AgentMetricsRequest, error: Exception
    ) -> metrics_pb2.AgentMetricsResponse:
        """The samples the node reported, or ``error`` when there are none."""
        since = self._clock() - query.duration_seconds if query.duration_seconds else 0.0
        points = await self._store.query_metrics(node_id, query.agent_id, since=since)
        if not points:
            raise error
        if query.max_points:
            points = points[-query.max_points :]
        response = metrics_pb2.AgentMetricsResponse(agent_id=query.agent_id)
        for point in points:
            response.data_points.add(
                timestamp=timestamp(point.time),
                cpu_percent=point.cpu_percent,
                memory_bytes=point.memory_bytes,
            )
        return response

    # -- events --------------------------------------------------------------------

    async def WatchEvents(
        self, request: fleet_pb2.WatchEventsRequest, context: Context
    ) -> AsyncIterator[event_pb2.Event]:
        self._guard(context)
        node_id = check_node_id(request.node_id) if request.node_id else None
        agent_id = _check_agent_id(request.agent_id, "agent_id") if request.agent_id else None
        types = _check_types(request.types)
        if request.HasField("since") and request.after_sequence:
            raise InvalidArgument("after_sequence", "give since or after_sequence, not both")
        if request.after_sequence:
            await self._check_retained(request.after_sequence, context)
            start, since = request.after_sequence, 0.0
        else:
            start = 0
            since = wall_seconds(request.since) if request.HasField("since") else math.inf
        wanted = _EventFilter(node_id, agent_id, types)
        replay, cursor = await self._replay(start, since=since, wanted=wanted)
        await context.send_initial_metadata(((REPLAY_COUNT_KEY, str(len(replay))),))
        for record in replay:
            yield event_record_to_proto(record)
        while True:
            batch = await wanted.page(self._store, after_sequence=cursor)
            for record in batch:
                cursor = record.sequence
                if wanted.type_matches(record):
                    yield event_record_to_proto(record)
            if len(batch) == _EVENT_PAGE:
                continue
            if self._closing.is_set():
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the Manager is stopping")
            await self._events.wait(self._poll_interval_s)

    async def _replay(
        self, start: int, *, since: float, wanted: _EventFilter
    ) -> tuple[list[EventRecord], int]:
        """The stored events after ``start`` at or after ``since`` that match, and the
        sequence to follow from."""
        replay: list[EventRecord] = []
        cursor = start
        while True:
            batch = await wanted.page(self._store, after_sequence=cursor)
            for record in batch:
                cursor = record.sequence
                if record.time >= since and wanted.type_matches(record):
                    replay.append(record)
            if len(batch) < _EVENT_PAGE:
                return replay, cursor

    async def _check_retained(self, after_sequence: int, context: Context) -> None:
        oldest = await self._store.list_events(after_sequence=0, limit=1)
        if oldest and oldest[0].sequence > after_sequence + 1:
            await context.abort(
                grpc.StatusCode.OUT_OF_RANGE,
                f"events after {after_sequence} are no longer retained (oldest is "
                f"{oldest[0].sequence}); list again and resume from there",
            )


@dataclass(frozen=True, slots=True)
class _EventFilter:
    """Which events a WatchEvents stream sends."""

    node_id: str | None
    agent_id: str | None
    types: frozenset[str]

    async def page(self, store: ManagerStore, *, after_sequence: int) -> list[EventRecord]:
        return await store.list_events(
            after_sequence=after_sequence,
            node_id=self.node_id,
            agent_id=self.agent_id,
            limit=_EVENT_PAGE,
        )

    def type_matches(self, record: EventRecord) -> bool:
        return not self.types or record.type in self.types


def _agents_json(desired: Mapping[str, DesiredRecord], node: NodeRecord) -> str:
    record = desired.get(node.node_id)
    return record.agents if record is not None else "[]"


def _placed(node: NodeRecord, sets: Sequence[Any]) -> dict[Any, str]:
    try:
        return dict(owners(node.node_id, node.labels, sets))
    except AgentConflict:
        return {}


def _agent_state(
    node_id: str, spec: agent_pb2.AgentSpec | None, info: agent_pb2.AgentInfo | None
) -> agent_pb2.AgentState:
    state = agent_pb2.AgentState(node_id=node_id)
    if spec is not None:
        state.spec.CopyFrom(spec)
    if info is not None:
        state.info.CopyFrom(info)
    return state


def _shown(state: agent_pb2.AgentState, agent_id: str, status: NodeStatus) -> agent_pb2.AgentState:
    """Agents of a NotReady node show phase UNKNOWN, keeping the last report's details."""
    if status is NodeStatus.NOT_READY:
        last = agent_pb2.AgentPhase.Name(state.info.phase) if state.HasField("info") else "none"
        state.info.agent_id = agent_id
        state.info.phase = agent_pb2.AGENT_PHASE_UNKNOWN
        state.info.message = f"node {state.node_id} is NotReady (last reported phase: {last})"
    return state


def _check_types(types: Sequence[event_pb2.EventType.ValueType]) -> frozenset[str]:
    """The EventType names (model spelling) to stream; empty means every type."""
    names: set[str] = set()
    for index, value in enumerate(types):
        if value == event_pb2.EVENT_TYPE_UNSPECIFIED or value not in event_pb2.EventType.values():
            raise InvalidArgument(f"types[{index}]", f"unknown event type {value}")
        member = event_pb2.EventType.Name(value).removeprefix("EVENT_TYPE_")
        names.add(str(EventType[member]))
    return frozenset(names)
