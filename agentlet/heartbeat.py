"""One heartbeat as agentlet sends it: the record, its limits, and its JSON encoding.

What: ``Heartbeat`` (frozen), ``HeartbeatStatus`` (the four statuses) and
``encode_heartbeat`` producing exactly the wire object of ``api/heartbeat.md``.
The record checks its own fields against the wire limits, so a bad value (a huge
version string, a NaN cpu) is clamped or refused here and never reaches the daemon.

What not: no sending (``agentlet.transport``), no scheduling (``agentlet.heartbeater``).
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass

from agentlet.config import AGENT_ID_PATTERN, MAX_VERSION_CHARS

__all__ = [
    "MAX_CPU_PERCENT",
    "MAX_FRAME_BYTES",
    "MAX_MEMORY_BYTES",
    "MAX_PID",
    "MAX_SEQ",
    "Heartbeat",
    "HeartbeatStatus",
    "clamp_cpu",
    "clamp_memory",
    "encode_heartbeat",
    "encode_line",
]

MAX_PID = 2**22
MAX_CPU_PERCENT = 100.0 * 1024
MAX_MEMORY_BYTES = 2**53
MAX_SEQ = 2**63 - 1
#: One line on the Unix socket, newline included; also the HTTP body limit.
MAX_FRAME_BYTES = 65_536


class HeartbeatStatus(enum.StrEnum):
    """What the agent says about itself."""

    STARTING = "starting"
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """One heartbeat; construction validates every field against the wire limits."""

    agent_id: str
    pid: int
    timestamp: float
    """Unix seconds, the agent's wall clock."""
    version: str
    status: HeartbeatStatus
    cpu: float
    """Percent of one core (a process tree may exceed 100)."""
    memory: int
    """Resident set size in bytes."""
    seq: int | None = None
    token: str | None = None
    """Only on the Unix socket, and only when the agent has one."""

    def __post_init__(self) -> None:
        _require(AGENT_ID_PATTERN.fullmatch(self.agent_id) is not None, "agent_id")
        _require(1 <= self.pid <= MAX_PID, "pid")
        _require(math.isfinite(self.timestamp) and self.timestamp >= 0, "timestamp")
        _require(len(self.version) <= MAX_VERSION_CHARS and self.version.isprintable(), "version")
        _require(isinstance(self.status, HeartbeatStatus), "status")
        _require(math.isfinite(self.cpu) and 0 <= self.cpu <= MAX_CPU_PERCENT, "cpu")
        _require(0 <= self.memory <= MAX_MEMORY_BYTES, "memory")
        _require(self.seq is None or 0 <= self.seq <= MAX_SEQ, "seq")


def _require(ok: bool, field: str) -> None:
    if not ok:
        raise ValueError(f"heartbeat field {field!r} is out of range")


def clamp_cpu(value: float) -> float:
    """Bring a sampled cpu percent into the wire range (NaN becomes 0)."""
    if not math.isfinite(value) or value < 0:
        return 0.0
    return min(value, MAX_CPU_PERCENT)


def clamp_memory(value: int) -> int:
    """Bring a sampled RSS into the wire range."""
    return max(0, min(value, MAX_MEMORY_BYTES))


def encode_heartbeat(heartbeat: Heartbeat, *, include_token: bool) -> bytes:
    """The JSON object for ``heartbeat`` (compact, UTF-8, no trailing newline)."""
    body: dict[str, object] = {
        "agent_id": heartbeat.agent_id,
        "pid": heartbeat.pid,
        "timestamp": heartbeat.timestamp,
        "version": heartbeat.version,
        "status": heartbeat.status.value,
        "cpu": heartbeat.cpu,
        "memory": heartbeat.memory,
    }
    if heartbeat.seq is not None:
        body["seq"] = heartbeat.seq
    if include_token and heartbeat.token is not None:
        body["token"] = heartbeat.token
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def encode_line(heartbeat: Heartbeat, *, include_token: bool) -> bytes:
    """One Unix-socket frame: the object and ``\\n``; raise when over the frame limit."""
    line = encode_heartbeat(heartbeat, include_token=include_token) + b"\n"
    if len(line) > MAX_FRAME_BYTES:
        raise ValueError(f"heartbeat line of {len(line)} bytes exceeds {MAX_FRAME_BYTES}")
    return line
