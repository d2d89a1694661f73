"""agentlet's Prometheus metrics, hand-formatted in the text exposition format 0.0.4.

What: ``MetricsSnapshot`` (the numbers) and ``format_metrics`` (the text). Written by
hand because importing ``prometheus_client`` costs ~60 ms inside someone else's
process for five lines of output.

What not: no registry, no HTTP (``agentlet.http_api`` serves the text).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["CONTENT_TYPE", "MetricsSnapshot", "format_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """What /metrics reports, read at one instant."""

    agent_id: str
    cpu_percent: float
    memory_bytes: int
    heartbeats_sent: int
    heartbeats_failed: int
    last_delivery_age_s: float | None


_FAMILIES = (
    ("agentlet_cpu_percent", "gauge", "CPU use of the agent, percent of one core."),
    ("agentlet_memory_bytes", "gauge", "Resident memory of the agent in bytes."),
    ("agentlet_heartbeats_sent_total", "counter", "Heartbeats delivered to the daemon."),
    ("agentlet_heartbeats_failed_total", "counter", "Heartbeats not delivered or rejected."),
    (
        "agentlet_last_heartbeat_age_seconds",
        "gauge",
        "Seconds since the last delivered heartbeat (NaN before the first).",
    ),
)


def format_metrics(snapshot: MetricsSnapshot) -> str:
    """The exposition text: HELP and TYPE lines, one sample per family, agent_id label."""
    values = (
        snapshot.cpu_percent,
        snapshot.memory_bytes,
        snapshot.heartbeats_sent,
        snapshot.heartbeats_failed,
        math.nan if snapshot.last_delivery_age_s is None else snapshot.last_delivery_age_s,
    )
    labels = f'{{agent_id="{_escape_label(snapshot.agent_id)}"}}'
    lines: list[str] = []
    for (name, kind, help_text), value in zip(_FAMILIES, values, strict=True):
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f"{name}{labels} {_number(value)}")
    return "\n".join(lines) + "\n"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value) if isinstance(value, float) else str(value)
