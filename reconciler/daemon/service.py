"""DaemonService: the node daemon's gRPC API, thin over the controller.

Each method converts the request with ``reconciler.convert``, calls one controller
function, and converts the answer back. Errors are model errors, mapped to status
codes by ``reconciler.rpc.ErrorInterceptor``; nothing here builds a status itself.

The Manager pushes desired state through ``SyncAgentStates``; operators and the
Manager's proxy call the rest.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from reconciler import __version__
from reconciler.api.agent.v1 import agent_pb2, metrics_pb2
from reconciler.api.daemon.v1 import daemon_pb2, daemon_pb2_grpc
from reconciler.convert import (
    Clocks,
    node_state_from_proto,
    operation_from_proto,
    operation_to_proto,
    record_to_info,
    resource_point,
    spec_to_proto,
)
from reconciler.daemon.clock import Clock
from reconciler.daemon.controller import AgentView, Controller, UpdateOutcome
from reconciler.model.errors import Conflict, InvalidArgument
from reconciler.model.ids import AgentId, is_valid_agent_id

__all__ = ["DaemonService", "MetricsSource"]

_MAX_OPERATION_ID = 128
_UPDATE_OUTCOMES = {
    UpdateOutcome.SUCCEEDED: daemon_pb2.UPDATE_OUTCOME_SUCCEEDED,
    UpdateOutcome.ROLLED_BACK: daemon_pb2.UPDATE_OUTCOME_ROLLED_BACK,
    UpdateOutcome.FAILED: daemon_pb2.UPDATE_OUTCOME_FAILED,
    UpdateOutcome.UNCHANGED: daemon_pb2.UPDATE_OUTCOME_UNCHANGED,
}


class MetricsSource(Protocol):
    """Where GetAgentMetrics reads samples (``reconciler.daemon.monitor``)."""

    def points(self, agent_id: AgentId, *, since_wall_s: float) -> list[Any]: ...


Context = Any


class DaemonService(daemon_pb2_grpc.DaemonServiceServicer):
    """The DaemonService servicer."""

    def __init__(
        self,
        *,
        controller: Controller,
        metrics: MetricsSource,
        clock: Clock,
        settings: Callable[[], Mapping[str, Any]],
    ) -> None:
        self._controller = controller
        self._metrics = metrics
        self._clock = clock
        self._settings = settings

    async def ListAgents(
        self, request: daemon_pb2.ListAgentsRequest, context: Context
    ) -> daemon_pb2.ListAgentsResponse:
        wanted = {_agent_id(a, field="agent_ids") for a in request.agent_ids}
        selector = dict(request.label_selector)
        clocks = self._clocks()
        views = [
            v
            for v in self._controller.agents()
            if (not wanted or v.record.agent_id in wanted) and _selected(v, selector)
        ]
        return daemon_pb2.ListAgentsResponse(
            node_id=self._controller.node_id,
            agents=[self._state(view, clocks) for view in views],
            current_generation=self._controller.generation,
            observed_generation=self._controller.observed_generation,
        )

    async def OperateAgent(
        self, request: agent_pb2.AgentOperationRequest, context: Context
    ) -> agent_pb2.AgentOperationResponse:
        agent_id = _agent_id(request.agent_id, field="agent_id")
        operation = operation_from_proto(request.operation)
        operation_id = _operation_id(request.operation_id)
        outcome = await self._controller.operate(agent_id, operation, operation_id=operation_id)
        view = self._controller.agent(agent_id)
        return agent_pb2.AgentOperationResponse(
            agent_id=agent_id,
            operation=operation_to_proto(operation),
            operation_id=operation_id,
            duplicate=outcome.duplicate,
            agent=self._info(view, self._clocks()),
            message=outcome.message,
        )

    async def GetAgentMetrics(
        self, request: metrics_pb2.AgentMetricsRequest, context: Context
    ) -> metrics_pb2.AgentMetricsResponse:
        agent_id = _agent_id(request.agent_id, field="agent_id")
        if request.duration_seconds < 0:
            raise InvalidArgument("duration_seconds", "must not be negative")
        self._controller.agent(agent_id)  # NOT_FOUND for an unknown agent
        duration = request.duration_seconds or 3600.0
        points = self._metrics.points(agent_id, since_wall_s=self._clock.wall() - duration)
        if request.max_points > 0:
            points = points[-request.max_points :]
        data: list[metrics_pb2.ResourceDataPoint] = [
            resource_point(p.time_wall_s, p.cpu_percent, p.memory_bytes) for p in points
        ]
        return metrics_pb2.AgentMetricsResponse(agent_id=agent_id, data_points=data)

    async def SyncAgentStates(
        self, request: daemon_pb2.SyncAgentStatesRequest, context: Context
    ) -> daemon_pb2.SyncAgentStatesResponse:
        if request.node_id and request.node_id != self._controller.node_id:
            raise Conflict(f"this is node {self._controller.node_id!r}, not {request.node_id!r}")
        if request.generation == 0:
            raise InvalidArgument("generation", "must be greater than 0")
        state = node_state_from_proto(request.generation, request.agents)
        outcome = await self._controller.apply(state)
        return daemon_pb2.SyncAgentStatesResponse(
            accepted_generation=outcome.generation,
            current_generation=self._controller.generation,
            observed_generation=self._controller.observed_generation,
            unchanged=not outcome.changed,
        )

    async def GetConfig(
        self, request: daemon_pb2.GetConfigRequest, context: Context
    ) -> daemon_pb2.GetConfigResponse:
        return daemon_pb2.GetConfigResponse(
            node_id=self._controller.node_id,
            settings_json=json.dumps(self._settings(), sort_keys=True),
            current_generation=self._controller.generation,
            observed_generation=self._controller.observed_generation,
            daemon_version=__version__,
        )

    async def PushUpdate(
        self, request: daemon_pb2.PushUpdateRequest, context: Context
    ) -> daemon_pb2.PushUpdateResponse:
        agent_id = _agent_id(request.agent_id, field="agent_id")
        if not request.version:
            raise InvalidArgument("version", "must not be empty")
        if not 0 < request.health_deadline_seconds <= 3600:
            raise InvalidArgument("health_deadline_seconds", "must be between 0 and 3600")
        operation_id = _operation_id(request.operation_id)
        result = await self._controller.push_update(
            agent_id,
            version=request.version,
            command=tuple(request.command),
            deadline_s=request.health_deadline_seconds,
            operation_id=operation_id,
        )
        return daemon_pb2.PushUpdateResponse(
            agent_id=agent_id,
            outcome=_UPDATE_OUTCOMES[result.outcome],
            previous_version=result.previous_version,
            current_version=result.current_version,
            operation_id=operation_id,
            duplicate=result.duplicate,
            agent=self._info(self._controller.agent(agent_id), self._clocks()),
            message=result.message,
        )

    # -- helpers -----------------------------------------------------------------

    def _clocks(self) -> Clocks:
        return Clocks(monotonic=self._clock.monotonic(), wall=self._clock.wall())

    def _info(self, view: AgentView, clocks: Clocks) -> agent_pb2.AgentInfo:
        return record_to_info(view.record, spec=view.spec, override=view.override, clocks=clocks)

    def _state(self, view: AgentView, clocks: Clocks) -> agent_pb2.AgentState:
        state = agent_pb2.AgentState(
            node_id=self._controller.node_id, info=self._info(view, clocks)
        )
        if view.spec is not None:
            state.spec.CopyFrom(spec_to_proto(view.spec))
        return state


def _agent_id(text: str, *, field: str) -> AgentId:
    if not text:
        raise InvalidArgument(field, "must not be empty")
    if not is_valid_agent_id(text):
        raise InvalidArgument(field, f"{text[:80]!r} is not a valid agent id")
    return AgentId(text)


def _operation_id(text: str) -> str:
    if len(text) > _MAX_OPERATION_ID or not text.isprintable():
        raise InvalidArgument("operation_id", f"must be 1-{_MAX_OPERATION_ID} printable characters")
    return text


def _selected(view: AgentView, selector: Mapping[str, str]) -> bool:
    if not selector:
        return True
    labels = view.spec.labels if view.spec else {}
    return all(labels.get(key) == value for key, value in selector.items())
