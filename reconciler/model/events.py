"""Typed events: what happened to an agent or a node, when, and why.

The daemon records them as they happen, reports them to the Manager, and the CLI
streams them (``reconciler events --follow``). They are facts for people; the control
loop never reads them back.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from reconciler.model.ids import AgentId, NodeId

__all__ = ["Event", "EventType"]


class EventType(enum.StrEnum):
    """The kinds of event (the same list as the API's EventType, in CamelCase)."""

    AGENT_STARTED = "AgentStarted"
    AGENT_EXITED = "AgentExited"
    AGENT_UNHEALTHY = "AgentUnhealthy"
    AGENT_BACKOFF = "AgentBackoff"
    AGENT_STOPPED = "AgentStopped"
    AGENT_HEALTHY = "AgentHealthy"
    SPEC_APPLIED = "SpecApplied"
    UPDATE_ROLLED_BACK = "UpdateRolledBack"
    UPDATE_SUCCEEDED = "UpdateSucceeded"
    OPERATION_APPLIED = "OperationApplied"
    NODE_REGISTERED = "NodeRegistered"
    NODE_READY = "NodeReady"
    NODE_NOT_READY = "NodeNotReady"
    AGENT_SET_APPLIED = "AgentSetApplied"
    AGENT_SET_DELETED = "AgentSetDeleted"
    AGENT_FAILED = "AgentFailed"
    AGENT_ADOPTED = "AgentAdopted"
    NODE_DELETED = "NodeDeleted"


@dataclass(frozen=True, slots=True)
class Event:
    """One event. ``time`` is wall-clock Unix seconds (events are for people)."""

    type: EventType
    time: float
    node_id: NodeId
    agent_id: AgentId | None = None
    reason: str = ""
    message: str = ""
