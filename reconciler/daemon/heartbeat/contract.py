"""What the heartbeat receivers need from the rest of the daemon, and what they answer.

What: the two Protocols the controller implements (``AgentDirectory`` says who an
agent is, ``HeartbeatSink`` takes validated heartbeats), the identity record, the
transport names, the stable rejection reasons of ``api/heartbeat.md``, and a fake of
each Protocol for tests (``FakeAgentDirectory``, ``RecordingSink``).

What not: no decoding (``codec``), no sockets (``unix``, ``http``), no counting
(``stats``). The sink decides what a heartbeat means (liveness, unmanaged agents);
receivers only validate, authenticate and hand over.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from reconciler.model.heartbeat import Heartbeat
from reconciler.model.ids import AgentId

__all__ = [
    "MAX_FRAME_BYTES",
    "AgentDirectory",
    "AgentIdentity",
    "FakeAgentDirectory",
    "HeartbeatSink",
    "RecordedHeartbeat",
    "RecordingSink",
    "RejectReason",
    "Transport",
]

#: One Unix-socket line (newline included) or one HTTP body, at most.
MAX_FRAME_BYTES: Final = 65_536


class Transport(enum.StrEnum):
    """Where a heartbeat came in (a label on every counter)."""

    UNIX = "unix"
    HTTP = "http"


class RejectReason(enum.StrEnum):
    """Why a heartbeat or a connection was refused: short stable words on the wire."""

    TOO_LARGE = "too_large"
    BAD_JSON = "bad_json"
    BAD_FIELD = "bad_field"
    UNKNOWN_AGENT = "unknown_agent"
    FORBIDDEN = "forbidden"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    UNAUTHORIZED = "unauthorized"
    BUSY = "busy"
    SHUTTING_DOWN = "shutting_down"
    TIMEOUT = "timeout"


@dataclass(frozen=True, slots=True)
class AgentIdentity:
    """Who the daemon says an agent is."""

    pid: int | None
    """The agent's main process (None while it is not running)."""
    token: str
    """Its per-agent secret (an empty token never matches)."""


class AgentDirectory(Protocol):
    """Looks up the agents the daemon manages; called once per heartbeat, keep it O(1)."""

    def identity(self, agent_id: AgentId) -> AgentIdentity | None:
        """The agent's identity, or None for an agent the daemon does not know."""
        ...


class HeartbeatSink(Protocol):
    """Takes validated, authenticated heartbeats; must be cheap and never block."""

    def record(self, heartbeat: Heartbeat, *, received_at_s: float, transport: str) -> None:
        """Note ``heartbeat``, received at ``received_at_s`` on the daemon's monotonic clock."""
        ...


class FakeAgentDirectory:
    """An ``AgentDirectory`` backed by a dict the test edits."""

    def __init__(self, agents: Mapping[str, AgentIdentity] | None = None) -> None:
        self.agents: dict[str, AgentIdentity] = dict(agents or {})

    def identity(self, agent_id: AgentId) -> AgentIdentity | None:
        return self.agents.get(agent_id)


@dataclass(frozen=True, slots=True)
class RecordedHeartbeat:
    """One call a ``RecordingSink`` saw."""

    heartbeat: Heartbeat
    received_at_s: float
    transport: str


class RecordingSink:
    """A ``HeartbeatSink`` that keeps every call, in order."""

    def __init__(self) -> None:
        self.records: list[RecordedHeartbeat] = []

    def record(self, heartbeat: Heartbeat, *, received_at_s: float, transport: str) -> None:
        self.records.append(RecordedHeartbeat(heartbeat, received_at_s, transport))

    def for_agent(self, agent_id: str) -> list[RecordedHeartbeat]:
        """The calls for one agent id, in order."""
        return [r for r in self.records if r.heartbeat.agent_id == agent_id]
