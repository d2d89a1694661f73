"""The daemon's Prometheus metrics, read from its parts at scrape time.

``DaemonCollector`` turns what the controller, the event log and the heartbeat
receivers already count into metric families when ``/metrics`` is scraped, so the
control loop and the heartbeat path do no metrics work of their own:

- reconcile passes and time (a summary), work queue depth, desired and observed
  generation, agents by phase;
- per agent: starts, restarts, crashes, backoffs and stops (``CountingEventLog``
  counts the controller's events by agent; restarts come from the records);
- events by type, heartbeats received / accepted / rejected by reason and transport.

``daemon_registry`` puts it together with the RPC and span collectors of
``reconciler.telemetry`` in a registry of its own (never the global one, so two apps
in one process do not clash); ``reconciler.telemetry.MetricsEndpoint`` serves it.

What not: no HTTP serving here, no Manager metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from reconciler.daemon.controller import AgentView
from reconciler.daemon.events import EventLog
from reconciler.daemon.heartbeat import HeartbeatStats
from reconciler.daemon.heartbeat.stats import Sample
from reconciler.model.events import Event, EventType
from reconciler.model.ids import AgentId, NodeId
from reconciler.model.status import Phase

__all__ = [
    "AGENT_COUNTERS",
    "ControllerView",
    "CountingEventLog",
    "DaemonCollector",
    "daemon_registry",
]

#: Per-agent counters: metric name (without ``_total``) -> the event type it counts.
AGENT_COUNTERS: dict[str, tuple[EventType, str]] = {
    "reconciler_agent_starts": (EventType.AGENT_STARTED, "Processes started for the agent."),
    "reconciler_agent_crashes": (
        EventType.AGENT_EXITED,
        "Exits nobody asked for (including failed spawns).",
    ),
    "reconciler_agent_backoffs": (EventType.AGENT_BACKOFF, "Times the agent entered backoff."),
    "reconciler_agent_stops": (EventType.AGENT_STOPPED, "Stops the daemon asked for."),
}


class ControllerView(Protocol):
    """What the collector reads from the controller (``Controller`` has all of it)."""

    reconcile_passes: int
    reconcile_seconds: float

    @property
    def queue_depth(self) -> int: ...
    @property
    def generation(self) -> int: ...
    @property
    def observed_generation(self) -> int: ...
    def agents(self) -> list[AgentView]: ...


class CountingEventLog(EventLog):
    """An ``EventLog`` that also counts events per (agent, type), in ``emit`` itself:
    a dict increment, nothing queued, nothing to drain."""

    def __init__(self, *, node_id: NodeId, wall: Callable[[], float], capacity: int = 1000) -> None:
        super().__init__(node_id=node_id, wall=wall, capacity=capacity)
        self._by_agent: dict[tuple[AgentId, EventType], int] = {}

    def emit(
        self,
        type_: EventType,
        *,
        agent_id: AgentId | None = None,
        reason: str = "",
        message: str = "",
    ) -> Event:
        event = super().emit(type_, agent_id=agent_id, reason=reason, message=message)
        if agent_id is not None:
            key = (agent_id, type_)
            self._by_agent[key] = self._by_agent.get(key, 0) + 1
        return event

    def count(self, agent_id: AgentId, type_: EventType) -> int:
        """How many ``type_`` events ``agent_id`` had (since it was last forgotten)."""
        return self._by_agent.get((agent_id, type_), 0)

    def forget_except(self, known: Collection[AgentId]) -> None:
        """Drop the counts of agents the node no longer has (their series end)."""
        for key in [key for key in self._by_agent if key[0] not in known]:
            del self._by_agent[key]


class DaemonCollector(Collector):
    """Reads the controller, events and heartbeat counters when scraped."""

    def __init__(
        self,
        *,
        controller: ControllerView,
        events: CountingEventLog,
        heartbeats: HeartbeatStats,
    ) -> None:
        self._controller = controller
        self._events = events
        self._heartbeats = heartbeats

    def collect(self) -> Iterator[Metric]:
        views = self._controller.agents()
        yield from self._loop()
        yield self._phases(views)
        yield from self._per_agent(views)
        yield self._event_totals()
        yield from _heartbeat_families(self._heartbeats.collect())

    def _loop(self) -> Iterator[Metric]:
        c = self._controller
        duration = SummaryMetricFamily(
            "reconciler_reconcile_duration_seconds",
            "Reconcile passes (_count) and the seconds they took (_sum).",
        )
        duration.add_metric([], c.reconcile_passes, c.reconcile_seconds)
        yield duration
        yield _gauge(
            "reconciler_workqueue_depth", "Agent ids waiting to be reconciled.", c.queue_depth
        )
        yield _gauge(
            "reconciler_desired_generation", "Generation of the desired state held.", c.generation
        )
        yield _gauge(
            "reconciler_observed_generation",
            "Newest generation every agent has been reconciled against.",
            c.observed_generation,
        )

    def _phases(self, views: Iterable[AgentView]) -> Metric:
        counts = dict.fromkeys(Phase, 0)
        for view in views:
            counts[view.record.phase] += 1
        family = GaugeMetricFamily("reconciler_agents", "Agents by phase.", labels=["phase"])
        for phase, count in counts.items():
            family.add_metric([str(phase)], count)
        return family

    def _per_agent(self, views: list[AgentView]) -> Iterator[Metric]:
        known = [view.record.agent_id for view in views]
        self._events.forget_except(set(known))
        restarts = CounterMetricFamily(
            "reconciler_agent_restarts", "Restarts after an exit.", labels=["agent_id"]
        )
        for view in views:
            restarts.add_metric([view.record.agent_id], view.record.restart_count)
        yield restarts
        for name, (type_, documentation) in AGENT_COUNTERS.items():
            family = CounterMetricFamily(name, documentation, labels=["agent_id"])
            for agent_id in known:
                family.add_metric([agent_id], self._events.count(agent_id, type_))
            yield family

    def _event_totals(self) -> Metric:
        family = CounterMetricFamily(
            "reconciler_events", "Events the daemon recorded, by type.", labels=["type"]
        )
        for type_, count in sorted(self._events.counts.items()):
            family.add_metric([str(type_)], count)
        return family


def _gauge(name: str, documentation: str, value: float) -> Metric:
    family = GaugeMetricFamily(name, documentation)
    family.add_metric([], value)
    return family


_HEARTBEAT_HELP = {
    "reconciler_heartbeats_received": "Heartbeats read, before validation.",
    "reconciler_heartbeats_accepted": "Heartbeats that passed every check.",
    "reconciler_heartbeats_rejected": "Heartbeats or connections refused, by reason.",
    "reconciler_heartbeats_recorded": "Accepted heartbeats handed to the controller after a queue.",
    "reconciler_heartbeat_record_latency_seconds": "Receipt-to-controller seconds, summed.",
    "reconciler_heartbeat_connections_open": "Heartbeat connections open now.",
}


def _heartbeat_families(samples: Iterable[Sample]) -> Iterator[Metric]:
    """``HeartbeatStats`` rows as families: ``*_total`` are counters, the rest gauges."""
    families: dict[str, Metric] = {}
    for sample in samples:
        counter = sample.name.endswith("_total")
        name = sample.name.removesuffix("_total")
        family = families.get(name)
        if family is None:
            labels = [label for label, _ in sample.labels]
            documentation = _HEARTBEAT_HELP.get(name, name)
            family = (
                CounterMetricFamily(name, documentation, labels=labels)
                if counter
                else GaugeMetricFamily(name, documentation, labels=labels)
            )
            families[name] = family
        family.add_metric([value for _, value in sample.labels], sample.value)  # type: ignore[attr-defined]
    yield from families.values()


def daemon_registry(collectors: Iterable[Collector]) -> CollectorRegistry:
    """A registry of its own holding ``collectors``."""
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    return registry
