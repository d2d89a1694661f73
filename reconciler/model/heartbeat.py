"""One heartbeat, as the daemon keeps it after decoding and validation.

The wire format is documented in ``api/heartbeat.md``; decoding lives in
``reconciler.daemon.heartbeat.codec``. This module is the pure record the rest of the
daemon reads. Liveness is judged by ``received_at_s`` on the daemon's monotonic clock,
never by the agent's ``timestamp``, which is kept only to report clock skew.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from reconciler.model.ids import AgentId

__all__ = ["Heartbeat", "ReportedStatus"]


class ReportedStatus(enum.StrEnum):
    """What an agent says about itself."""

    STARTING = "starting"
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"


class Heartbeat(NamedTuple):
    """A validated heartbeat from one agent.

    Immutable like the model's dataclasses, but a named tuple: one is built for every
    heartbeat of every agent, and a frozen dataclass costs three times as much to
    build (0.78 us against 0.25 us here), the largest single cost of socket ingest.
    """

    agent_id: AgentId
    pid: int
    timestamp: float
    """The agent's wall clock, Unix seconds (for skew reporting only)."""
    version: str
    status: ReportedStatus
    cpu_percent: float
    memory_bytes: int
    seq: int | None = None
