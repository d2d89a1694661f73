"""The heartbeat loop: sample, build, send every interval; back off while the daemon is away.

What: ``Heartbeater.run()`` sends one heartbeat at once (status ``starting`` unless the
program set one), then one per interval (``healthy`` by default). A delivery that fails
is retried with jittered exponential backoff (tenacity, policy in ``BackoffPolicy``)
with a fresh sample each time, so when the daemon comes back heartbeats resume without
restarting anything. ``seq`` grows by one per heartbeat delivered.

Failures never reach the host program: they are counted (``failed``), logged at debug
level and passed to ``on_failure``; a callback that raises is logged and ignored.
A rejection the daemon writes back on the socket arrives between heartbeats through
``report_failure`` and the transport reconnects on the next send; the interval paces
those, so a daemon that rejects every line sees one line per interval, not a storm.

What not: no HTTP API (``agentlet.http_api``), no config parsing (``agentlet.config``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import tenacity

from agentlet.config import AgentletConfig
from agentlet.heartbeat import Heartbeat, HeartbeatStatus
from agentlet.sampling import ProcessSampler, Sample, Sampler
from agentlet.transport import (
    HttpTransport,
    ReceiverBusy,
    SocketOrHttpTransport,
    Transport,
    TransportError,
    UnixSocketTransport,
)

__all__ = ["BackoffPolicy", "FailureCallback", "Heartbeater", "SuccessCallback", "make_transport"]

log = logging.getLogger("agentlet.heartbeat")
_T = TypeVar("_T")

SuccessCallback = Callable[[Heartbeat], None]
FailureCallback = Callable[[TransportError], None]


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """How long to wait between failed deliveries: uniform in [initial, 2^n * initial].

    ``max_s`` None caps the wait at the heartbeat interval, so a daemon that comes back
    hears from the agent within one interval; jitter spreads a fleet's reconnects.
    """

    initial_s: float = 0.1
    max_s: float | None = None

    def wait(self, interval_s: float) -> tenacity.wait.wait_base:
        """The tenacity wait strategy for this policy (honours HTTP Retry-After)."""
        cap = interval_s if self.max_s is None else self.max_s
        floor = min(self.initial_s, cap)
        return _WaitWithRetryAfter(
            tenacity.wait_random_exponential(multiplier=floor, max=cap, min=floor)
        )


class _WaitWithRetryAfter(tenacity.wait.wait_base):
    def __init__(self, inner: tenacity.wait.wait_base) -> None:
        self._inner = inner

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        delay = self._inner(retry_state)
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None and outcome.failed else None
        if isinstance(error, ReceiverBusy) and error.retry_after_s is not None:
            return max(delay, error.retry_after_s)
        return delay


class Heartbeater:
    """Sends heartbeats for one agent until ``stop()``; never raises into the caller."""

    def __init__(
        self,
        transport: Transport,
        *,
        agent_id: str,
        interval_s: float,
        version: str = "",
        pid: int | None = None,
        token: str | None = None,
        sampler: Sampler | None = None,
        backoff: BackoffPolicy = BackoffPolicy(),
        on_success: SuccessCallback | None = None,
        on_failure: FailureCallback | None = None,
        traceparent: str | None = None,
    ) -> None:
        self._transport = transport
        self._agent_id = agent_id
        self._interval_s = interval_s
        self._version = version
        self._pid = os.getpid() if pid is None else pid
        self._token = token
        self._sampler: Sampler = ProcessSampler() if sampler is None else sampler
        self._wait = backoff.wait(interval_s)
        self._on_success = on_success
        self._on_failure = on_failure
        self._traceparent = traceparent
        self._status: HeartbeatStatus | None = None
        self._stopping = asyncio.Event()
        self._started_ns = time.time_ns()
        self._last_delivery_monotonic_s: float | None = None
        self.sent = 0
        """Heartbeats delivered (written to the socket, or answered 202)."""
        self.failed = 0
        """Deliveries that failed, plus rejections the daemon wrote back."""
        self.last_sample = Sample(cpu_percent=0.0, memory_bytes=0)
        self.last_error: TransportError | None = None

    @classmethod
    def from_config(
        cls,
        config: AgentletConfig,
        *,
        sampler: Sampler | None = None,
        pid: int | None = None,
        backoff: BackoffPolicy = BackoffPolicy(),
        on_success: SuccessCallback | None = None,
        on_failure: FailureCallback | None = None,
    ) -> Heartbeater:
        """A heartbeater for ``config``; raise ValueError when heartbeats are off."""
        if not config.heartbeats_enabled or config.agent_id is None:
            raise ValueError("heartbeats are off: no agent id or no receiver configured")
        transport = make_transport(config)
        heartbeater = cls(
            transport,
            agent_id=config.agent_id,
            interval_s=config.interval_s,
            version=config.version,
            pid=pid,
            token=config.token,
            sampler=sampler,
            backoff=backoff,
            on_success=on_success,
            on_failure=on_failure,
            traceparent=config.traceparent,
        )
        if isinstance(transport, SocketOrHttpTransport):
            transport.socket.on_rejected = heartbeater.report_failure
        elif isinstance(transport, UnixSocketTransport):
            transport.on_rejected = heartbeater.report_failure
        return heartbeater

    @property
    def interval_s(self) -> float:
        """Seconds between heartbeats."""
        return self._interval_s

    @property
    def status(self) -> HeartbeatStatus:
        """The status the next heartbeat will carry."""
        if self._status is not None:
            return self._status
        return HeartbeatStatus.STARTING if self.sent == 0 else HeartbeatStatus.HEALTHY

    def set_status(self, status: HeartbeatStatus | str) -> None:
        """Report ``status`` from the next heartbeat on (ValueError for an unknown word)."""
        self._status = HeartbeatStatus(status)

    def last_delivery_age_s(self) -> float | None:
        """Seconds since the last delivered heartbeat; None before the first."""
        if self._last_delivery_monotonic_s is None:
            return None
        return time.monotonic() - self._last_delivery_monotonic_s

    def stop(self) -> None:
        """Ask ``run`` to return after the current attempt."""
        self._stopping.set()

    async def run(self) -> None:
        """Heartbeat until ``stop()`` (or cancellation); then close the transport."""
        self._started_ns = time.time_ns()
        try:
            while not self._stopping.is_set():
                await self._deliver()
                await self._pause(self._interval_s)
        finally:
            with contextlib.suppress(Exception):
                await self._transport.close()

    async def _deliver(self) -> None:
        retrying = tenacity.AsyncRetrying(
            wait=self._wait,
            retry=tenacity.retry_if_exception_type(TransportError),
            stop=lambda _state: self._stopping.is_set(),
            sleep=self._pause,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._attempt()
        except TransportError:
            pass  # stopping while the daemon is away
        except Exception:
            log.exception("heartbeat loop error; continuing at the next interval")

    async def _attempt(self) -> None:
        if self._stopping.is_set():
            return
        heartbeat = await self._build()
        try:
            await self._transport.send(heartbeat)
        except TransportError as exc:
            self.report_failure(exc)
            raise
        self._delivered(heartbeat)

    async def _build(self) -> Heartbeat:
        self.last_sample = await self._sample()
        return Heartbeat(
            agent_id=self._agent_id,
            pid=self._pid,
            timestamp=time.time(),
            version=self._version,
            status=self.status,
            cpu=self.last_sample.cpu_percent,
            memory=self.last_sample.memory_bytes,
            seq=self.sent,
            token=self._token,
        )

    async def _sample(self) -> Sample:
        try:
            if self._sampler.blocking:
                return await asyncio.to_thread(self._sampler.sample)
            return self._sampler.sample()
        except Exception:
            log.debug("sampling failed; reporting zeros", exc_info=True)
            return Sample(cpu_percent=0.0, memory_bytes=0)

    def _delivered(self, heartbeat: Heartbeat) -> None:
        first = self.sent == 0
        self.sent += 1
        self._last_delivery_monotonic_s = time.monotonic()
        if first:
            self._trace_first(heartbeat)
        _call_safely(self._on_success, heartbeat)

    def report_failure(self, error: TransportError) -> None:
        """Count a failed delivery or a rejection and tell ``on_failure``."""
        self.failed += 1
        self.last_error = error
        log.debug("heartbeat not delivered: %s", error)
        _call_safely(self._on_failure, error)

    def _trace_first(self, heartbeat: Heartbeat) -> None:
        if self._traceparent is None:
            return
        from agentlet.tracing import record_first_heartbeat  # only agents with a trace pay

        record_first_heartbeat(self._traceparent, heartbeat, started_ns=self._started_ns)

    async def _pause(self, delay_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay_s)


def _call_safely(callback: Callable[[_T], None] | None, value: _T) -> None:
    if callback is None:
        return
    try:
        callback(value)
    except Exception:
        log.exception("heartbeat callback %r raised; ignored", callback)


def make_transport(config: AgentletConfig) -> Transport:
    """The socket transport when a socket is configured (with HTTP behind it when the
    socket refuses this process and a URL and token are there), else HTTP (raise when
    neither)."""
    timeout_s = min(max(config.interval_s, 1.0), 10.0)
    http = None
    if config.heartbeat_url is not None and config.token is not None:
        http = HttpTransport(config.heartbeat_url, token=config.token, timeout_s=timeout_s)
    if config.heartbeat_socket is not None:
        unix = UnixSocketTransport(config.heartbeat_socket, timeout_s=timeout_s)
        return unix if http is None else SocketOrHttpTransport(unix, http)
    if http is not None:
        return http
    raise ValueError("no heartbeat receiver configured")
