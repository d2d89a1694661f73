"""The daemon's link to the Manager: register, heartbeat, report, and pull when behind.

The link is optional and never in the control loop's way: while the Manager is away
the daemon keeps reconciling its last desired state and nothing is stopped because of
the outage. What the link holds while it cannot report is bounded: the observed state
is read fresh from the controller at each report (only the latest exists), events wait
in a bounded queue that drops the oldest, and metrics are read from the monitor's ring
buffers by time, so memory stays flat however long the outage.

Every call carries a deadline. Failed calls are retried (tenacity, exponential backoff
with jitter) only for UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED; any other
status is a real answer and is logged, then tried again on the next tick.

Convergence does not depend on the Manager's push reaching us: each heartbeat answer
carries the node's desired generation, and a daemon that is behind pulls it with
GetDesiredState.

The observed generation a heartbeat or a registration tells is never newer than the
one of the last report the Manager took: a report carries the agents' states and the
generation they were observed under, read together, so a Manager (and ``apply
--wait``) that sees generation N acted on also holds agent states from N on, never the
states of an older report beside a newer generation.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential_jitter,
)

from reconciler import __version__
from reconciler.api.agent.v1 import event_pb2, metrics_pb2
from reconciler.api.manager.v1 import manager_pb2, manager_pb2_grpc
from reconciler.convert import (
    Clocks,
    event_to_proto,
    node_state_from_proto,
    record_to_info,
    resource_point,
    timestamp,
)
from reconciler.daemon.clock import Clock
from reconciler.daemon.controller import Controller
from reconciler.daemon.events import EventLog
from reconciler.model.errors import ReconcilerError, StaleGeneration
from reconciler.model.events import Event
from reconciler.model.ids import AgentId
from reconciler.rpc import RETRYABLE_CODES, is_retryable

__all__ = ["LinkPolicy", "ManagerLink", "MetricsReader"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LinkPolicy:
    """Timing of the link, from the daemon's ``manager`` settings."""

    heartbeat_interval_s: float = 10.0
    report_interval_s: float = 15.0
    call_timeout_s: float = 5.0
    retry_initial_s: float = 0.5
    retry_max_s: float = 30.0
    max_pending_events: int = 1000
    report_debounce_s: float = 0.2
    """A burst of changes is reported once, this long after the first."""


class MetricsReader(Protocol):
    """The monitor's ring buffers, read by time."""

    def points(self, agent_id: AgentId, *, since_wall_s: float) -> list[Any]: ...


class ManagerLink:
    """Keeps one node registered with the Manager and reporting to it."""

    def __init__(
        self,
        *,
        channel: grpc.aio.Channel,
        controller: Controller,
        events: EventLog,
        metrics: MetricsReader,
        clock: Clock,
        policy: LinkPolicy,
        labels: dict[str, str],
        daemon_address: Callable[[], str],
    ) -> None:
        self._stub = manager_pb2_grpc.ManagerServiceStub(channel)
        self._channel = channel
        self._controller = controller
        self._metrics = metrics
        self._clock = clock
        self._policy = policy
        self._labels = labels
        self._daemon_address = daemon_address
        self._subscription = events.subscribe(capacity=policy.max_pending_events)
        self._pending: deque[Event] = deque(maxlen=policy.max_pending_events)
        self._registered = asyncio.Event()
        self._changed = asyncio.Event()
        self._metrics_sent_until = clock.wall()
        self._refused_generation = 0
        self._reported_generation = 0
        """The observed generation of the last report the Manager took."""
        self._pulling = asyncio.Lock()
        self.calls_failed = 0
        self.registrations = 0
        controller.on_change(self._changed.set)

    @property
    def registered(self) -> bool:
        return self._registered.is_set()

    async def run(self) -> None:
        """Register, then heartbeat and report until cancelled."""
        try:
            await asyncio.gather(self._heartbeat_loop(), self._report_loop())
        finally:
            self._subscription.close()

    # -- registration and heartbeats ---------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            if not self.registered:
                await self._register()
            await self._heartbeat()
            await asyncio.sleep(self._policy.heartbeat_interval_s)

    async def _register(self) -> None:
        while True:
            try:
                answer = await self._call(self._stub.RegisterNode, self._registration())
            except grpc.aio.AioRpcError as error:
                self._failed("RegisterNode", error)
                if not is_retryable(error):
                    await asyncio.sleep(self._policy.retry_max_s)
                continue
            self.registrations += 1
            self._registered.set()
            self._changed.set()
            log.info(
                "registered with the Manager",
                extra={"node_id": self._controller.node_id, "desired": answer.desired_generation},
            )
            await self._catch_up(answer.desired_generation)
            return

    def _registration(self) -> manager_pb2.RegisterNodeRequest:
        return manager_pb2.RegisterNodeRequest(
            node_id=self._controller.node_id,
            hostname=socket.gethostname(),
            ip=_local_ip(),
            labels=self._labels,
            version=__version__,
            daemon_address=self._daemon_address(),
            capabilities=["pidfd", "adoption", "push-update"],
            current_generation=self._controller.generation,
            observed_generation=self._told_observed_generation(),
        )

    def _told_observed_generation(self) -> int:
        return min(self._controller.observed_generation, self._reported_generation)

    async def _heartbeat(self) -> None:
        request = manager_pb2.HeartbeatRequest(
            node_id=self._controller.node_id,
            current_generation=self._controller.generation,
            observed_generation=self._told_observed_generation(),
            sent_at=timestamp(self._clock.wall()),
        )
        try:
            answer = await self._call(self._stub.Heartbeat, request)
        except grpc.aio.AioRpcError as error:
            self._failed("Heartbeat", error)
            return
        if not answer.known:
            log.warning("the Manager does not know this node; registering again")
            self._registered.clear()
            return
        await self._catch_up(answer.desired_generation)

    async def _catch_up(self, desired_generation: int) -> None:
        """Pull the desired state when the Manager holds a newer generation than we do.

        The heartbeat and report loops both call this; one pull at a time, so the
        second sees the generation the first fetched instead of fetching it again.
        """
        async with self._pulling:
            await self._pull_if_behind(desired_generation)

    async def _pull_if_behind(self, desired_generation: int) -> None:
        if desired_generation <= self._controller.generation:
            return
        if desired_generation == self._refused_generation:
            return
        request = manager_pb2.GetDesiredStateRequest(node_id=self._controller.node_id)
        try:
            answer = await self._call(self._stub.GetDesiredState, request)
            state = node_state_from_proto(answer.generation, answer.agents)
            await self._controller.apply(state)
        except grpc.aio.AioRpcError as error:
            self._failed("GetDesiredState", error)
        except StaleGeneration:
            pass  # a push got here first
        except ReconcilerError as error:
            self._refused_generation = desired_generation
            log.error("refusing desired generation %d: %s", desired_generation, error)

    # -- reports -----------------------------------------------------------------

    async def _report_loop(self) -> None:
        while True:
            await self._registered.wait()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=self._policy.report_interval_s)
                await asyncio.sleep(self._policy.report_debounce_s)
            except TimeoutError:
                pass
            self._changed.clear()
            await self._report()

    async def _report(self) -> None:
        events = [*self._pending, *self._subscription.drain()]
        self._pending.clear()
        request = self._observed(events)
        try:
            answer = await self._call(self._stub.SyncAgentStates, request)
        except grpc.aio.AioRpcError as error:
            self._pending.extend(events)
            self._failed("SyncAgentStates", error)
            return
        self._reported_generation = max(self._reported_generation, request.observed_generation)
        await self._catch_up(answer.desired_generation)
        await self._report_metrics()

    def _observed(self, events: Sequence[Event]) -> manager_pb2.SyncAgentStatesRequest:
        clocks = Clocks(monotonic=self._clock.monotonic(), wall=self._clock.wall())
        infos = [
            record_to_info(view.record, spec=view.spec, override=view.override, clocks=clocks)
            for view in self._controller.agents()
        ]
        wire_events: list[event_pb2.Event] = [event_to_proto(e) for e in events]
        return manager_pb2.SyncAgentStatesRequest(
            node_id=self._controller.node_id,
            observed_generation=self._controller.observed_generation,
            current_generation=self._controller.generation,
            agents=infos,
            events=wire_events,
        )

    async def _report_metrics(self) -> None:
        since = self._metrics_sent_until
        now = self._clock.wall()
        batches: list[metrics_pb2.MetricData] = []
        for view in self._controller.agents():
            agent_id = view.record.agent_id
            points = [
                p for p in self._metrics.points(agent_id, since_wall_s=since) if p.time_wall_s < now
            ]
            if points:
                batches.append(
                    metrics_pb2.MetricData(
                        agent_id=agent_id,
                        data_points=[
                            resource_point(p.time_wall_s, p.cpu_percent, p.memory_bytes)
                            for p in points
                        ],
                    )
                )
        if not batches:
            self._metrics_sent_until = now
            return
        request = manager_pb2.ReportMetricsRequest(
            node_id=self._controller.node_id, metrics=batches
        )
        try:
            await self._call(self._stub.ReportMetrics, request)
        except grpc.aio.AioRpcError as error:
            self._failed("ReportMetrics", error)
            return
        self._metrics_sent_until = now

    # -- calls -------------------------------------------------------------------

    async def _call(self, method: Any, request: Any) -> Any:
        """One call with a deadline, retried with backoff while the failure is transient."""
        retrying = AsyncRetrying(
            retry=retry_if_exception(is_retryable),
            wait=wait_exponential_jitter(
                multiplier=self._policy.retry_initial_s, max=self._policy.retry_max_s
            ),
            stop=stop_after_delay(self._policy.heartbeat_interval_s * 3),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await method(request, timeout=self._policy.call_timeout_s)
        raise AssertionError("unreachable")  # pragma: no cover

    def _failed(self, method: str, error: grpc.aio.AioRpcError) -> None:
        self.calls_failed += 1
        code = error.code()
        if code == grpc.StatusCode.FAILED_PRECONDITION and "not registered" in (
            error.details() or ""
        ):
            self._registered.clear()
        level = (
            logging.DEBUG if code in RETRYABLE_CODES and self.calls_failed > 1 else logging.WARNING
        )
        log.log(level, "%s to the Manager failed: %s %s", method, code.name, error.details())


def _local_ip() -> str:
    """This host's address as its name resolves (loopback when it does not)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
