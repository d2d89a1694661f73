"""Counters shared by the heartbeat receivers, cheap on the hot path.

What: one ``TransportCounters`` per transport holding plain ints the receivers bump
directly (``received``, ``accepted``, ``rejected[reason]``, open connections, and for a
queued transport the records made and their total latency); ``HeartbeatStats`` owns
them, takes frozen ``snapshot()``s, and ``collect()``s ``Sample`` rows (metric name,
label pairs, value) that a Prometheus collector can turn into metric families without
this module importing prometheus_client.

What not: no locking (the receivers run on one event loop), no export (the daemon's
metrics module), no rates (Prometheus computes those).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from reconciler.daemon.heartbeat.contract import RejectReason, Transport

__all__ = ["HeartbeatStats", "Sample", "StatsSnapshot", "TransportCounters", "TransportSnapshot"]


class TransportCounters:
    """Mutable counters for one transport; receivers write the attributes directly."""

    __slots__ = (
        "accepted",
        "open_connections",
        "received",
        "record_latency_s_total",
        "recorded",
        "rejected",
        "sink_errors",
        "transport",
    )

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.received = 0
        self.accepted = 0
        self.rejected: dict[RejectReason, int] = {}
        self.open_connections = 0
        self.recorded = 0
        """Heartbeats handed to the sink after a queue (HTTP)."""
        self.record_latency_s_total = 0.0
        """Sum over ``recorded`` of receipt-to-sink seconds."""
        self.sink_errors = 0
        """Accepted heartbeats the sink raised on (a bug in the daemon, logged)."""

    def reject(self, reason: RejectReason) -> None:
        """Count one refusal."""
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def snapshot(self) -> TransportSnapshot:
        """A frozen copy."""
        return TransportSnapshot(
            transport=self.transport,
            received=self.received,
            accepted=self.accepted,
            rejected=MappingProxyType(dict(self.rejected)),
            open_connections=self.open_connections,
            recorded=self.recorded,
            record_latency_s_total=self.record_latency_s_total,
            sink_errors=self.sink_errors,
        )


@dataclass(frozen=True, slots=True)
class TransportSnapshot:
    """The counters of one transport at one moment."""

    transport: Transport
    received: int
    accepted: int
    rejected: Mapping[RejectReason, int]
    open_connections: int
    recorded: int
    record_latency_s_total: float
    sink_errors: int

    @property
    def rejected_total(self) -> int:
        """Refusals of every reason."""
        return sum(self.rejected.values())

    @property
    def average_latency_s(self) -> float:
        """Mean receipt-to-sink time of recorded heartbeats (0 when none)."""
        return self.record_latency_s_total / self.recorded if self.recorded else 0.0


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """Every transport's counters at one moment."""

    transports: Mapping[Transport, TransportSnapshot] = field(default_factory=dict)

    def get(self, transport: Transport) -> TransportSnapshot:
        """One transport's counters (all zero when it never counted)."""
        found = self.transports.get(transport)
        return found if found is not None else TransportCounters(transport).snapshot()


@dataclass(frozen=True, slots=True)
class Sample:
    """One exported value: ``name`` with ``labels`` as (name, value) pairs."""

    name: str
    labels: tuple[tuple[str, str], ...]
    value: float


class HeartbeatStats:
    """The counters of every receiver in one daemon."""

    def __init__(self) -> None:
        self._counters: dict[Transport, TransportCounters] = {}

    def counters(self, transport: Transport) -> TransportCounters:
        """The live counters of ``transport`` (created on first use, then shared)."""
        found = self._counters.get(transport)
        if found is None:
            found = self._counters[transport] = TransportCounters(transport)
        return found

    def snapshot(self) -> StatsSnapshot:
        """A frozen copy of everything."""
        return StatsSnapshot(MappingProxyType({t: c.snapshot() for t, c in self._counters.items()}))

    def collect(self) -> list[Sample]:
        """Rows for a metrics exporter (counters end in ``_total``)."""
        samples: list[Sample] = []
        for snap in self.snapshot().transports.values():
            samples.extend(_samples(snap))
        return samples


def _samples(snap: TransportSnapshot) -> list[Sample]:
    label = (("transport", str(snap.transport)),)
    rows = [
        Sample("reconciler_heartbeats_received_total", label, snap.received),
        Sample("reconciler_heartbeats_accepted_total", label, snap.accepted),
        Sample("reconciler_heartbeat_connections_open", label, snap.open_connections),
        Sample("reconciler_heartbeats_recorded_total", label, snap.recorded),
        Sample(
            "reconciler_heartbeat_record_latency_seconds_total", label, snap.record_latency_s_total
        ),
    ]
    for reason, count in sorted(snap.rejected.items()):
        labels = (*label, ("reason", str(reason)))
        rows.append(Sample("reconciler_heartbeats_rejected_total", labels, count))
    return rows
