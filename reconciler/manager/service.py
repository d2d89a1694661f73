"""ManagerService: what daemons call. Register, heartbeat, report, pull.

The servicer stays thin: it checks the request (every field is hostile), converts it,
calls the store or the ``Replanner`` (``fleet.FleetChanges``) and converts back.
Model errors become gRPC statuses in ``reconciler.rpc.ErrorInterceptor``.

The hot path stays off the store: Heartbeat, and the registration check and heartbeat
of SyncAgentStates and ReportMetrics, are answered from ``liveness.NodeTable``, which
writes heartbeats behind in batches and knows each node's desired generation.

Node status is derived here and nowhere else: Ready while the last heartbeat (stored,
or seen by this replica and not yet stored) is younger than
``nodes.not_ready_after_s``, else NotReady; agents of a NotReady node are shown with
phase UNKNOWN (never "stopped": the Manager does not know). ``Readiness``
turns status changes into NodeReady / NodeNotReady events and feeds a gauge;
``EventLog`` stores events and wakes ``WatchEvents`` streams of this process.

With TLS on, every RPC naming a node must come from that node's certificate
(``reconciler.tls.require_node``): PERMISSION_DENIED otherwise.

What it does not do: decide desired state (``plan.py`` via ``fleet.FleetChanges``) or
call daemons (``push.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Protocol

import grpc

from reconciler.api.agent.v1 import agent_pb2, event_pb2, metrics_pb2, node_pb2
from reconciler.api.manager.v1 import manager_pb2, manager_pb2_grpc
from reconciler.config import ManagerSettings, parse_host_port
from reconciler.convert import (
    event_from_proto,
    message_to_json,
    spec_messages_from_json,
    timestamp,
    wall_seconds,
)
from reconciler.manager.agentset import check_labels
from reconciler.manager.liveness import NodeTable
from reconciler.manager.records import (
    EventRecord,
    MetricPointRecord,
    NodeRecord,
    ObservedAgentRecord,
)
from reconciler.manager.store import ManagerStore
from reconciler.model.errors import Conflict, InvalidArgument
from reconciler.model.events import EventType
from reconciler.model.ids import is_valid_agent_id, is_valid_node_id
from reconciler.tls import require_node

__all__ = [
    "MAX_EVENTS_PER_REPORT",
    "Clock",
    "EventLog",
    "ManagerServicer",
    "NodeStatus",
    "NotRegistered",
    "PushRequester",
    "Readiness",
    "Replanner",
    "check_node_id",
    "event_record_to_proto",
    "node_info",
    "node_status",
    "status_to_proto",
]

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Context = grpc.aio.ServicerContext[Any, Any]

#: Events one SyncAgentStates may carry; the rest are dropped (``accepted_events``).
MAX_EVENTS_PER_REPORT: Final = 1000
_MAX_TEXT: Final = 253
_MAX_CAPABILITIES: Final = 64


class NotRegistered(Conflict):
    """The node must call RegisterNode first (FAILED_PRECONDITION)."""

    def __init__(self, node_id: str) -> None:
        super().__init__(f"node {node_id!r} is not registered; call RegisterNode first")


class NodeStatus(enum.StrEnum):
    """Whether a node's daemon is in contact; derived from its last heartbeat."""

    READY = "Ready"
    NOT_READY = "NotReady"


def node_status(node: NodeRecord, *, now: float, not_ready_after_s: float) -> NodeStatus:
    """Ready while the node heartbeated within ``not_ready_after_s``."""
    return _status_at(node.last_heartbeat_at, now=now, not_ready_after_s=not_ready_after_s)


def _status_at(last_heartbeat_at: float, *, now: float, not_ready_after_s: float) -> NodeStatus:
    if now - last_heartbeat_at < not_ready_after_s:
        return NodeStatus.READY
    return NodeStatus.NOT_READY


_STATUS_PROTO: Final = {
    NodeStatus.READY: node_pb2.NODE_STATUS_READY,
    NodeStatus.NOT_READY: node_pb2.NODE_STATUS_NOT_READY,
}


def status_to_proto(status: NodeStatus) -> node_pb2.NodeStatus.ValueType:
    """The NodeStatus enum value of a status."""
    return _STATUS_PROTO[status]


def node_info(node: NodeRecord, *, status: NodeStatus, agent_count: int) -> node_pb2.NodeInfo:
    """A NodeInfo message for a stored node."""
    info = node_pb2.NodeInfo(
        node_id=node.node_id,
        hostname=node.hostname,
        ip=node.ip,
        labels=dict(node.labels),
        version=node.version,
        daemon_address=node.daemon_address,
        capabilities=list(node.capabilities),
        status=status_to_proto(status),
        desired_generation=node.desired_generation,
        observed_generation=node.observed_generation,
        agent_count=agent_count,
    )
    info.registered_at.CopyFrom(timestamp(node.registered_at))
    info.last_heartbeat_at.CopyFrom(timestamp(node.last_heartbeat_at))
    return info


def event_record_to_proto(record: EventRecord) -> event_pb2.Event:
    """An Event message for a stored event (unknown types are sent as UNSPECIFIED)."""
    try:
        kind = event_pb2.EventType.Value(f"EVENT_TYPE_{EventType(record.type).name}")
    except ValueError:
        kind = event_pb2.EVENT_TYPE_UNSPECIFIED
    return event_pb2.Event(
        sequence=record.sequence,
        type=kind,
        node_id=record.node_id,
        agent_id=record.agent_id or "",
        reason=record.reason,
        message=record.message,
        time=timestamp(record.time),
    )


def check_node_id(node_id: str, *, path: str = "node_id") -> str:
    """``node_id`` when it may name a node; else ``InvalidArgument``."""
    if not is_valid_node_id(node_id):
        raise InvalidArgument(path, f"{node_id[:64]!r} is not a valid node id")
    return node_id


def _check_text(text: str, path: str, *, limit: int = _MAX_TEXT) -> str:
    if len(text) > limit or "\x00" in text:
        raise InvalidArgument(path, f"at most {limit} characters, no NUL")
    return text


def _check_ip(text: str) -> str:
    if text:
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise InvalidArgument("ip", f"{text[:64]!r} is not an IP address") from None
    return text


def _check_address(text: str) -> str:
    if text:
        try:
            parse_host_port(text)
        except ValueError as exc:
            raise InvalidArgument("daemon_address", str(exc)) from None
    return text


def _check_capabilities(items: Sequence[str]) -> tuple[str, ...]:
    if len(items) > _MAX_CAPABILITIES:
        raise InvalidArgument("capabilities", f"at most {_MAX_CAPABILITIES}")
    return tuple(_check_text(c, f"capabilities[{i}]", limit=64) for i, c in enumerate(items))


class Replanner(Protocol):
    """Recomputes one node's desired state (``fleet.FleetChanges`` implements it)."""

    async def replan_node(self, node_id: str) -> int:
        """The node's desired generation after recomputing its agents."""


class PushRequester(Protocol):
    """Asks for a node's desired state to be pushed (``push.Pusher`` implements it)."""

    def request(self, node_ids: Iterable[str]) -> None: ...


class EventLog:
    """Stores events (bounded to ``retention.events_max``) and wakes local watchers;
    watchers also poll, for events other Manager replicas write."""

    def __init__(self, store: ManagerStore, *, keep_last: int) -> None:
        self._store = store
        self._keep_last = keep_last
        self._changed = asyncio.Event()

    async def add(self, events: Sequence[EventRecord]) -> list[EventRecord]:
        """Store ``events``; returns them with their sequences."""
        if not events:
            return []
        added = await self._store.add_events(events, keep_last=self._keep_last)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return added

    async def wait(self, timeout_s: float) -> None:
        """Return when events were added here, or after ``timeout_s``."""
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout_s)


def _event(
    kind: EventType, *, now: float, node_id: str, message: str, agent_id: str | None = None
) -> EventRecord:
    return EventRecord(
        sequence=0,
        time=now,
        node_id=node_id,
        agent_id=agent_id,
        type=str(kind),
        reason=str(kind),
        message=message,
    )


class Readiness:
    """Notices nodes turning NotReady (by sweeping) and Ready again (on heartbeats),
    records an event for each change, and reports the count per status. Heartbeat
    times come from the ``NodeTable``: the store's, or newer ones seen here.

    Every replica sweeps, so each change is first claimed in the store (``claim``,
    ``ManagerStore.claim_readiness``) under a mark every replica computes alike (the
    change and the last heartbeat before the silence): only the first replica records
    the event.
    """

    def __init__(
        self,
        table: NodeTable,
        events: EventLog,
        *,
        not_ready_after_s: float,
        clock: Clock = time.time,
        on_counts: Callable[[Mapping[NodeStatus, int]], None] | None = None,
        claim: Callable[[str, str], Awaitable[bool]] | None = None,
    ) -> None:
        self._table = table
        self._events = events
        self._after_s = not_ready_after_s
        self._clock = clock
        self._on_counts = on_counts
        self._claim = claim
        self._last: dict[str, NodeStatus] = {}
        self._silent_since: dict[str, float] = {}

    def latest(self, node: NodeRecord) -> NodeRecord:
        """``node`` with the newest heartbeat seen here, maybe not yet stored."""
        return self._table.overlay(node)

    def status(self, node: NodeRecord) -> NodeStatus:
        """The node's status now."""
        return node_status(
            self._table.overlay(node), now=self._clock(), not_ready_after_s=self._after_s
        )

    async def heartbeat(self, node_id: str) -> None:
        """A heartbeat arrived: a node seen NotReady is Ready again."""
        if self._last.get(node_id) is NodeStatus.NOT_READY:
            self._last[node_id] = NodeStatus.READY
            silent_since = self._silent_since.pop(node_id, None)
            if not await self._first(node_id, f"Ready after {silent_since!r}"):
                return
            message = f"node {node_id} is Ready: heartbeats resumed"
            await self._events.add(
                [_event(EventType.NODE_READY, now=self._clock(), node_id=node_id, message=message)]
            )

    async def _first(self, node_id: str, mark: str) -> bool:
        return True if self._claim is None else await self._claim(node_id, mark)

    async def sweep(self) -> None:
        """Compare every node's status with the last sweep; record the changes."""
        await self._table.refresh()
        beats = self._table.last_heartbeats()
        now = self._clock()
        counts = dict.fromkeys(NodeStatus, 0)
        changes: list[EventRecord] = []
        for node_id, last_at in beats.items():
            status = _status_at(last_at, now=now, not_ready_after_s=self._after_s)
            counts[status] += 1
            before = self._last.get(node_id)
            self._last[node_id] = status
            if status is NodeStatus.NOT_READY and before is NodeStatus.READY:
                self._silent_since[node_id] = last_at
                if not await self._first(node_id, f"NotReady after {last_at!r}"):
                    continue
                message = f"node {node_id} is NotReady: no heartbeat for {now - last_at:.0f}s"
                changes.append(
                    _event(EventType.NODE_NOT_READY, now=now, node_id=node_id, message=message)
                )
        for gone in [node_id for node_id in self._last if node_id not in beats]:
            del self._last[gone]
            self._silent_since.pop(gone, None)
        await self._events.add(changes)
        if self._on_counts is not None:
            self._on_counts(counts)

    async def run(self, interval_s: float) -> None:
        """Sweep every ``interval_s`` until cancelled; store outages are logged."""
        while True:
            try:
                await self.sweep()
            except Exception:
                log.warning("node readiness sweep failed", exc_info=True)
            await asyncio.sleep(interval_s)


class ManagerServicer(manager_pb2_grpc.ManagerServiceServicer):
    """ManagerService over a store; ``replanner`` recomputes a registering node's
    desired state and ``pusher`` pushes it when the daemon is behind."""

    def __init__(
        self,
        store: ManagerStore,
        *,
        settings: ManagerSettings,
        replanner: Replanner,
        pusher: PushRequester,
        events: EventLog,
        readiness: Readiness,
        table: NodeTable,
        tls_enabled: bool = False,
        clock: Clock = time.time,
    ) -> None:
        self._store = store
        self._table = table
        self._settings = settings
        self._replanner = replanner
        self._pusher = pusher
        self._events = events
        self._readiness = readiness
        self._tls_enabled = tls_enabled
        self._clock = clock

    def _caller_is(self, context: Context, node_id: str) -> str:
        check_node_id(node_id)
        require_node(context, node_id, tls_enabled=self._tls_enabled)
        return node_id

    async def _registered(self, node_id: str) -> None:
        if await self._table.desired_generation(node_id) is None:
            raise NotRegistered(node_id)

    async def RegisterNode(
        self, request: manager_pb2.RegisterNodeRequest, context: Context
    ) -> manager_pb2.RegisterNodeResponse:
        node_id = self._caller_is(context, request.node_id)
        now = self._clock()
        node = NodeRecord(
            node_id=node_id,
            hostname=_check_text(request.hostname, "hostname"),
            ip=_check_ip(request.ip),
            labels=check_labels(request.labels, path="labels"),
            version=_check_text(request.version, "version", limit=128),
            daemon_address=_check_address(request.daemon_address),
            capabilities=_check_capabilities(request.capabilities),
            registered_at=now,
            last_heartbeat_at=now,
            current_generation=request.current_generation,
            observed_generation=request.observed_generation,
        )
        stored = await self._store.upsert_node(node)
        self._table.registered(stored)
        message = f"node {node_id} registered (daemon {node.daemon_address or 'not callable'})"
        await self._events.add(
            [_event(EventType.NODE_REGISTERED, now=now, node_id=node_id, message=message)]
        )
        await self._readiness.heartbeat(node_id)
        generation = await self._replanner.replan_node(node_id)
        if generation > request.current_generation and node.daemon_address:
            self._pusher.request([node_id])
        response = manager_pb2.RegisterNodeResponse(node_id=node_id, desired_generation=generation)
        response.registered_at.CopyFrom(timestamp(stored.registered_at))
        return response

    async def Heartbeat(
        self, request: manager_pb2.HeartbeatRequest, context: Context
    ) -> manager_pb2.HeartbeatResponse:
        node_id = self._caller_is(context, request.node_id)
        now = self._clock()
        generation = await self._table.beat(
            node_id,
            at=now,
            current_generation=request.current_generation,
            observed_generation=request.observed_generation,
        )
        response = manager_pb2.HeartbeatResponse(known=generation is not None)
        response.server_time.CopyFrom(timestamp(now))
        if generation is not None:
            response.desired_generation = generation
            await self._readiness.heartbeat(node_id)
        return response

    async def ReportMetrics(
        self, request: manager_pb2.ReportMetricsRequest, context: Context
    ) -> manager_pb2.ReportMetricsResponse:
        node_id = self._caller_is(context, request.node_id)
        keep_after = self._clock() - self._settings.retention.metrics_window_s
        points = _metric_points(node_id, request.metrics, keep_after=keep_after)
        await self._registered(node_id)
        await self._store.add_metrics(points, keep_after=keep_after)
        return manager_pb2.ReportMetricsResponse(accepted_points=len(points))

    async def SyncAgentStates(
        self, request: manager_pb2.SyncAgentStatesRequest, context: Context
    ) -> manager_pb2.SyncAgentStatesResponse:
        node_id = self._caller_is(context, request.node_id)
        now = self._clock()
        observed = _observed(node_id, request.agents, now=now)
        events = _reported_events(node_id, request.events, now=now)
        await self._registered(node_id)
        await self._store.put_observed(node_id, observed)
        await self._events.add(events)
        generation = await self._table.beat(
            node_id,
            at=now,
            current_generation=request.current_generation,
            observed_generation=request.observed_generation,
        )
        if generation is None:
            raise NotRegistered(node_id)
        await self._readiness.heartbeat(node_id)
        return manager_pb2.SyncAgentStatesResponse(
            desired_generation=generation, accepted_events=len(events)
        )

    async def GetDesiredState(
        self, request: manager_pb2.GetDesiredStateRequest, context: Context
    ) -> manager_pb2.GetDesiredStateResponse:
        node_id = self._caller_is(context, request.node_id)
        await self._registered(node_id)
        desired = await self._store.get_desired(node_id)
        response = manager_pb2.GetDesiredStateResponse(node_id=node_id)
        if desired is not None:
            response.generation = desired.generation
            response.agents.extend(spec_messages_from_json(desired.agents))
        return response


def _check_agent_id(agent_id: str, path: str) -> str:
    if not is_valid_agent_id(agent_id):
        raise InvalidArgument(path, f"{agent_id[:64]!r} is not a valid agent id")
    return agent_id


def _metric_points(
    node_id: str, metrics: Sequence[metrics_pb2.MetricData], *, keep_after: float
) -> list[MetricPointRecord]:
    """The samples to keep, checked; samples older than the window are dropped."""
    points: list[MetricPointRecord] = []
    seen: set[str] = set()
    for index, data in enumerate(metrics):
        agent_id = _check_agent_id(data.agent_id, f"metrics[{index}].agent_id")
        if agent_id in seen:
            raise InvalidArgument(f"metrics[{index}].agent_id", f"{agent_id!r} appears twice")
        seen.add(agent_id)
        for number, point in enumerate(data.data_points):
            path = f"metrics[{index}].data_points[{number}]"
            if not math.isfinite(point.cpu_percent) or point.cpu_percent < 0:
                raise InvalidArgument(f"{path}.cpu_percent", "must be a finite number >= 0")
            at = wall_seconds(point.timestamp)
            if at >= keep_after:
                points.append(
                    MetricPointRecord(node_id, agent_id, at, point.cpu_percent, point.memory_bytes)
                )
    return points


def _observed(
    node_id: str, agents: Sequence[agent_pb2.AgentInfo], *, now: float
) -> list[ObservedAgentRecord]:
    records: list[ObservedAgentRecord] = []
    seen: set[str] = set()
    for index, info in enumerate(agents):
        agent_id = _check_agent_id(info.agent_id, f"agents[{index}].agent_id")
        if agent_id in seen:
            raise InvalidArgument(f"agents[{index}].agent_id", f"{agent_id!r} appears twice")
        seen.add(agent_id)
        records.append(ObservedAgentRecord(node_id, agent_id, message_to_json(info), now))
    return records


def _reported_events(
    node_id: str, events: Sequence[event_pb2.Event], *, now: float
) -> list[EventRecord]:
    """The first ``MAX_EVENTS_PER_REPORT`` events, checked and bound to the node."""
    records: list[EventRecord] = []
    for index, message in enumerate(events[:MAX_EVENTS_PER_REPORT]):
        path = f"events[{index}]"
        if message.node_id not in ("", node_id):
            raise InvalidArgument(f"{path}.node_id", f"{message.node_id[:64]!r} is not {node_id!r}")
        if message.agent_id:
            _check_agent_id(message.agent_id, f"{path}.agent_id")
        event = event_from_proto(message)
        records.append(
            EventRecord(
                sequence=0,
                time=event.time if message.HasField("time") else now,
                node_id=node_id,
                agent_id=event.agent_id,
                type=str(event.type),
                reason=_check_text(event.reason, f"{path}.reason", limit=128),
                message=_check_text(event.message, f"{path}.message", limit=4096),
            )
        )
    return records
