"""Pushing desired state to daemons (DaemonService.SyncAgentStates).

``Pusher.request(node_ids)`` returns at once; each node is pushed in the background,
at most ``push.concurrency`` at a time across the fleet, each call with a
``push.timeout_s`` deadline. A node already being pushed is pushed once more when the
running push ends (never twice at once), and every attempt reads the node's newest
desired state, so a burst of changes costs few calls.

Retries follow ``RetryPolicy`` (tenacity: exponential backoff with jitter, at most
``push.max_attempts`` attempts) and only for UNAVAILABLE, DEADLINE_EXCEEDED and
RESOURCE_EXHAUSTED, or a store outage. FAILED_PRECONDITION means the daemon holds a
newer generation than the one offered (another Manager replica pushed it, say): a
real answer, not retried. Pushing is idempotent by generation, so a retry after a
lost answer changes nothing on the daemon.

Failpoint ``manager.mid_push`` (``reconciler.failpoints``) sits after a daemon
accepted a generation and before its answer is recorded: killed there, the Manager
has pushed to some nodes and not to others, and knows it of none.

Tracing: each attempt to bring a node up to date is one ``push`` span (``node.id``,
``generation``, ``push.outcome``, ``push.attempts``), a child of the trace context of
the newest ``request`` for that node (e.g. the ApplyAgentSet server span), even though
it runs later in a background task; its SyncAgentStates calls are client spans under
it, which carry the context on to the daemon.

A push that gives up is not the end: every heartbeat answer carries the node's
desired generation and a daemon that is behind pulls it (GetDesiredState).

``DaemonChannels`` caches one channel per node, replaced (and the old one closed)
when the node registers another daemon address; FleetService's proxied calls use it
too.

What it does not do: decide what a node runs (``plan.py``), or change the store
other than noting the generations a daemon reported in its answer.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from reconciler import failpoints
from reconciler.api.daemon.v1 import daemon_pb2, daemon_pb2_grpc
from reconciler.config import PushSettings
from reconciler.convert import spec_messages_from_json
from reconciler.manager.store import ManagerStore
from reconciler.model.errors import ReconcilerError
from reconciler.rpc import RETRYABLE_CODES, is_retryable

__all__ = [
    "PUSH_SPAN",
    "ChannelFactory",
    "DaemonChannels",
    "PushOutcome",
    "PushResult",
    "Pusher",
    "RetryPolicy",
]

log = logging.getLogger(__name__)

#: Name of the span of one node's push.
PUSH_SPAN = "push"


#: Opens a channel to a daemon: (address, node id) -> channel. The node id lets a TLS
#: channel check the daemon's certificate names that node.
ChannelFactory = Callable[[str, str], grpc.aio.Channel]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a push is retried: ``max_attempts`` in all, waiting ``initial_s`` doubling
    to ``max_s`` between them, plus up to ``jitter_s`` of random jitter."""

    max_attempts: int = 5
    initial_s: float = 0.2
    max_s: float = 5.0
    jitter_s: float = 0.2

    @classmethod
    def from_settings(cls, push: PushSettings) -> RetryPolicy:
        """The policy for ``push`` settings."""
        return cls(max_attempts=push.max_attempts)

    def retrying(self) -> AsyncRetrying:
        """A tenacity controller for one push."""
        return AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=wait_exponential_jitter(
                multiplier=self.initial_s, max=self.max_s, jitter=self.jitter_s
            ),
            retry=retry_if_exception(is_retryable),
            reraise=False,
        )


class PushOutcome(enum.StrEnum):
    """How one node's push ended."""

    ACCEPTED = "Accepted"
    """The daemon stored the generation."""
    UNCHANGED = "Unchanged"
    """The daemon already held it (nothing was sent, or it answered unchanged)."""
    AHEAD = "Ahead"
    """The daemon holds a newer generation (FAILED_PRECONDITION)."""
    NO_ADDRESS = "NoAddress"
    """The node gave no daemon address (it pulls instead), or is not registered."""
    FAILED = "Failed"
    """Gave up: attempts exhausted or a permanent error; the daemon will pull."""


@dataclass(frozen=True, slots=True)
class PushResult:
    """One node's push: how it ended, the generation offered, attempts made."""

    node_id: str
    outcome: PushOutcome
    generation: int = 0
    attempts: int = 0
    message: str = ""


class DaemonChannels:
    """One channel per node, replaced when the node's daemon address changes."""

    def __init__(self, factory: ChannelFactory) -> None:
        self._factory = factory
        self._channels: dict[str, tuple[str, grpc.aio.Channel]] = {}

    def get(self, node_id: str, address: str) -> grpc.aio.Channel:
        """The channel to ``node_id``'s daemon at ``address``."""
        cached = self._channels.get(node_id)
        if cached is not None and cached[0] == address:
            return cached[1]
        if cached is not None:
            self._close_later(cached[1])
        channel = self._factory(address, node_id)
        self._channels[node_id] = (address, channel)
        return channel

    def stub(self, node_id: str, address: str) -> daemon_pb2_grpc.DaemonServiceAsyncStub:
        """A DaemonService stub for ``node_id``'s daemon."""
        return daemon_pb2_grpc.DaemonServiceStub(self.get(node_id, address))

    async def forget(self, node_id: str) -> None:
        """Close ``node_id``'s channel, if any (the node was deleted)."""
        cached = self._channels.pop(node_id, None)
        if cached is not None:
            await cached[1].close(grace=1.0)

    @staticmethod
    def _close_later(channel: grpc.aio.Channel) -> None:
        task = asyncio.get_running_loop().create_task(channel.close(grace=1.0))
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)

    async def close(self) -> None:
        """Close every channel."""
        channels = [channel for _, channel in self._channels.values()]
        self._channels.clear()
        await asyncio.gather(*(channel.close() for channel in channels))


_BACKGROUND: set[asyncio.Task[None]] = set()


class Pusher:
    """Pushes nodes' desired states in the background, bounded and coalesced."""

    def __init__(
        self,
        store: ManagerStore,
        channels: DaemonChannels,
        *,
        timeout_s: float,
        concurrency: int,
        retry: RetryPolicy,
        clock: Callable[[], float] = time.time,
        observe: Callable[[PushResult, float], None] | None = None,
    ) -> None:
        self._store = store
        self._channels = channels
        self._timeout_s = timeout_s
        self._slots = asyncio.Semaphore(concurrency)
        self._retry = retry
        self._clock = clock
        self._observe = observe
        self._running: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._causes: dict[str, otel_context.Context] = {}
        self._closed = False
        #: Makes the push spans (the app sets its own when tracing is on).
        self.tracer: trace.Tracer = trace.NoOpTracer()

    def request(self, node_ids: Iterable[str]) -> None:
        """Push each node soon (again after its running push, if one runs)."""
        if self._closed:
            return
        cause = otel_context.get_current()
        for node_id in node_ids:
            self._causes[node_id] = cause
            if node_id in self._running:
                self._again.add(node_id)
                continue
            task = asyncio.get_running_loop().create_task(self._worker(node_id))
            self._running[node_id] = task

    async def idle(self) -> None:
        """Return when no push is running or queued."""
        while self._running:
            await asyncio.gather(*list(self._running.values()), return_exceptions=True)

    async def close(self) -> None:
        """Stop pushing: cancel what runs; later requests are ignored."""
        self._closed = True
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _worker(self, node_id: str) -> None:
        try:
            while True:
                self._again.discard(node_id)
                async with self._slots:
                    await self._push_observed(node_id)
                if node_id not in self._again:
                    return
        finally:
            self._running.pop(node_id, None)
            self._causes.pop(node_id, None)

    async def _push_observed(self, node_id: str) -> None:
        started = time.monotonic()
        with self.tracer.start_as_current_span(
            PUSH_SPAN,
            context=self._causes.pop(node_id, None),
            attributes={"node.id": node_id},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                result = await self.push(node_id)
            except Exception as error:  # a bug must not kill the worker silently
                log.exception("push to node %s failed unexpectedly", node_id)
                result = PushResult(node_id, PushOutcome.FAILED, message=str(error))
            _describe_span(span, result)
        if self._observe is not None:
            self._observe(result, time.monotonic() - started)
        if result.outcome is PushOutcome.FAILED:
            log.warning(
                "push of generation %d to node %s failed after %d attempts: %s "
                "(the daemon will pull it)",
                result.generation,
                node_id,
                result.attempts,
                result.message,
            )

    async def push(self, node_id: str) -> PushResult:
        """Push ``node_id``'s newest desired state now, with retries."""
        attempts = 0
        offered = 0
        try:
            async for attempt in self._retry.retrying():
                with attempt:
                    attempts += 1
                    result = await self._attempt(node_id)
                    offered = result.generation
                    return _with_attempts(result, attempts)
        except RetryError as exhausted:
            error = exhausted.last_attempt.exception()
            return PushResult(node_id, PushOutcome.FAILED, offered, attempts, _describe(error))
        except grpc.aio.AioRpcError as error:
            return _refused(node_id, offered, attempts, error)
        raise AssertionError("unreachable: tenacity ends with a result or an error")

    async def _attempt(self, node_id: str) -> PushResult:
        node = await self._store.get_node(node_id)
        if node is None or not node.daemon_address:
            return PushResult(node_id, PushOutcome.NO_ADDRESS)
        desired = await self._store.get_desired(node_id)
        if desired is None or desired.generation <= node.current_generation:
            generation = desired.generation if desired is not None else 0
            return PushResult(node_id, PushOutcome.UNCHANGED, generation)
        request = daemon_pb2.SyncAgentStatesRequest(
            node_id=node_id,
            generation=desired.generation,
            agents=spec_messages_from_json(desired.agents),
        )
        try:
            stub = self._channels.stub(node_id, node.daemon_address)
        except ReconcilerError as error:
            return PushResult(node_id, PushOutcome.FAILED, desired.generation, message=str(error))
        try:
            response = await stub.SyncAgentStates(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as error:
            if error.code() in RETRYABLE_CODES:
                raise
            return _refused(node_id, desired.generation, 0, error)
        failpoints.failpoint("manager.mid_push")
        await self._store.record_heartbeat(
            node_id,
            at=self._clock(),
            current_generation=response.current_generation,
            observed_generation=response.observed_generation,
        )
        outcome = PushOutcome.UNCHANGED if response.unchanged else PushOutcome.ACCEPTED
        return PushResult(node_id, outcome, desired.generation)


def _describe_span(span: trace.Span, result: PushResult) -> None:
    span.set_attribute("generation", result.generation)
    span.set_attribute("push.outcome", str(result.outcome))
    span.set_attribute("push.attempts", result.attempts)
    if result.outcome is PushOutcome.FAILED:
        span.set_status(Status(StatusCode.ERROR, result.message))


def _with_attempts(result: PushResult, attempts: int) -> PushResult:
    return PushResult(result.node_id, result.outcome, result.generation, attempts, result.message)


def _refused(
    node_id: str, generation: int, attempts: int, error: grpc.aio.AioRpcError
) -> PushResult:
    """A non-retryable answer: FAILED_PRECONDITION means the daemon is ahead."""
    if error.code() is grpc.StatusCode.FAILED_PRECONDITION:
        return PushResult(node_id, PushOutcome.AHEAD, generation, attempts, _describe(error))
    return PushResult(node_id, PushOutcome.FAILED, generation, attempts, _describe(error))


def _describe(error: BaseException | None) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        code = error.code()
        return f"{code.name if code else 'UNKNOWN'}: {error.details()}"
    return f"{type(error).__name__}: {error}"
