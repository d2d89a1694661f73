"""Optional OpenTelemetry spans, children of the ``TRACEPARENT`` the daemon passed in.

What: ``record_first_heartbeat`` records one span, ``agentlet.first_heartbeat``, from
the heartbeater's start to its first delivered heartbeat, as a child of the trace
context of the action that started the agent. So one trace shows a change from
``apply`` to the agent's first heartbeat.

What not: agentlet configures no exporter; the host program's tracer provider (or the
no-op default) decides where spans go. When ``opentelemetry-api`` is not installed this
does nothing; it is imported only here, and only when a trace context is present.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from typing import Any

from agentlet.heartbeat import Heartbeat

__all__ = ["FIRST_HEARTBEAT_SPAN", "opentelemetry_available", "record_first_heartbeat"]

FIRST_HEARTBEAT_SPAN = "agentlet.first_heartbeat"
log = logging.getLogger("agentlet.tracing")


def opentelemetry_available() -> bool:
    """True when ``opentelemetry-api`` can be imported."""
    try:
        return importlib.util.find_spec("opentelemetry.trace") is not None
    except ModuleNotFoundError:
        return False


def record_first_heartbeat(
    traceparent: str,
    heartbeat: Heartbeat,
    *,
    started_ns: int,
    tracer_provider: Any = None,
) -> None:
    """Record the first-heartbeat span; silently nothing without OpenTelemetry."""
    if not opentelemetry_available():
        return
    try:
        _record(traceparent, heartbeat, started_ns=started_ns, tracer_provider=tracer_provider)
    except Exception:
        log.debug("could not record the first-heartbeat span", exc_info=True)


def _record(
    traceparent: str, heartbeat: Heartbeat, *, started_ns: int, tracer_provider: Any
) -> None:
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
    tracer = trace.get_tracer("agentlet", tracer_provider=tracer_provider)
    span = tracer.start_span(
        FIRST_HEARTBEAT_SPAN,
        context=parent,
        start_time=started_ns,
        attributes={
            "agent.id": heartbeat.agent_id,
            "agent.pid": heartbeat.pid,
            "agent.version": heartbeat.version,
            "heartbeat.status": heartbeat.status.value,
        },
    )
    span.end(end_time=time.time_ns())
