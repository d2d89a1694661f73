"""The HTTP heartbeat receiver: ``POST /heartbeat`` with a bearer token, ``GET /stats``.

What: ``HttpHeartbeatReceiver`` runs an aiohttp application (loopback by default).
A heartbeat is checked in this order, each step cheaper than the next: shutting down
(503), a declared ``Content-Length`` over the limit (413, body never read), no bearer
token (401), the body read with a bound and a deadline (413 / 408), the shared
decoder (400 with reason, field and detail), the agent's token (401, also for an
unknown agent so ids cannot be probed), then a bounded queue (202, or 429 with
``Retry-After`` when full). A pool of workers drains the queue into the sink and
measures receipt-to-sink latency. ``GET /stats`` (loopback peers only) shows the
counters. Slow clients: ``idle_timeout_s`` closes connections that do not complete a
request (aiohttp's keep-alive timer runs from connect), ``body_timeout_s`` bounds the
body, and an unread oversized body is discarded for at most ``lingering_time_s``.

What not: no decoding rules (``codec``), no Unix socket (``unix``). With
``allow_unmanaged`` an unknown agent id is accepted with any bearer token (it has none
the daemon gave it), which makes known ids distinguishable; that is the trade-off of
observing agents the daemon did not start.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import Final

import msgspec
from aiohttp import StreamReader, web

from reconciler.daemon.clock import Clock, SystemClock
from reconciler.daemon.heartbeat.codec import HeartbeatError, decode_heartbeat
from reconciler.daemon.heartbeat.contract import (
    MAX_FRAME_BYTES,
    AgentDirectory,
    HeartbeatSink,
    RejectReason,
    Transport,
)
from reconciler.daemon.heartbeat.identity import tokens_match
from reconciler.daemon.heartbeat.stats import HeartbeatStats, TransportCounters
from reconciler.model.heartbeat import Heartbeat

__all__ = ["HttpHeartbeatReceiver", "HttpReceiverConfig", "parse_listen"]

_log = logging.getLogger(__name__)
_JSON: Final = "application/json"
_ACCEPTED: Final = b'{"accepted":true}'


@dataclass(frozen=True, slots=True)
class HttpReceiverConfig:
    """Limits of the HTTP receiver (mirrors the ``heartbeat`` settings)."""

    host: str = "127.0.0.1"
    port: int = 7071
    """0 picks a free port (tests); read the real one from ``HttpHeartbeatReceiver.port``."""
    max_frame_bytes: int = MAX_FRAME_BYTES
    queue_size: int = 10_000
    workers: int = 4
    idle_timeout_s: float = 60.0
    body_timeout_s: float = 10.0
    lingering_time_s: float = 2.0
    retry_after_s: int = 1
    """Sent in ``Retry-After`` with 429 (whole seconds, as HTTP requires)."""
    drain_timeout_s: float = 5.0
    """How long ``stop`` waits for queued heartbeats to reach the sink."""
    allow_unmanaged: bool = False


def parse_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:7071"`` or ``"[::1]:7071"`` as (host, port); ValueError when malformed."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"expected host:port, got {listen!r}")
    return host.removeprefix("[").removesuffix("]"), int(port_text)


@dataclass(frozen=True, slots=True)
class _Job:
    heartbeat: Heartbeat
    received_at_s: float
    started_perf_s: float


class HttpHeartbeatReceiver:
    """Accepts heartbeats over HTTP and hands valid ones to the sink through a queue."""

    def __init__(
        self,
        config: HttpReceiverConfig,
        *,
        directory: AgentDirectory,
        sink: HeartbeatSink,
        stats: HeartbeatStats | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self.directory = directory
        self.sink = sink
        self.stats = stats if stats is not None else HeartbeatStats()
        self.counters: TransportCounters = self.stats.counters(Transport.HTTP)
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=config.queue_size)
        self._workers: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self._shutting_down = False

    @property
    def port(self) -> int:
        """The bound TCP port."""
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("the HTTP heartbeat receiver is not started")
        return int(self._runner.addresses[0][1])

    @property
    def shutting_down(self) -> bool:
        """True once ``begin_shutdown`` ran: new heartbeats get 503."""
        return self._shutting_down

    async def start(self) -> None:
        """Bind and start the workers."""
        if self._runner is not None:
            raise RuntimeError("the HTTP heartbeat receiver is already started")
        self._shutting_down = False
        runner = web.AppRunner(
            self._application(),
            handle_signals=False,
            access_log=None,
            keepalive_timeout=self.config.idle_timeout_s,
            lingering_time=self.config.lingering_time_s,
            auto_decompress=False,
            shutdown_timeout=self.config.drain_timeout_s,
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self.config.host, self.config.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._workers = [asyncio.create_task(self._work()) for _ in range(self.config.workers)]
        _log.info("heartbeat HTTP listening", extra={"address": str(runner.addresses[0])})

    def begin_shutdown(self) -> None:
        """Refuse new heartbeats with 503 (the queue still drains)."""
        self._shutting_down = True

    async def stop(self) -> None:
        """Answer 503, let the queue drain (bounded), stop the workers, close."""
        self.begin_shutdown()
        runner, self._runner = self._runner, None
        if runner is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.drain_timeout_s):
                await self.queue.join()
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        await runner.cleanup()

    def _application(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_frame_bytes)
        app.router.add_post("/heartbeat", self._post_heartbeat)
        app.router.add_get("/stats", self._get_stats)
        return app

    # -- handlers ------------------------------------------------------------------

    async def _post_heartbeat(self, request: web.Request) -> web.Response:
        started_perf_s = time.perf_counter()
        received_at_s = self.clock.monotonic()
        self.counters.received += 1
        refusal = self._precheck(request)
        if refusal is not None:
            return refusal
        bearer = _bearer_token(request.headers.get("Authorization"))
        if bearer is None:
            return self._refuse(401, RejectReason.UNAUTHORIZED)
        body = await self._read_body(request)
        if isinstance(body, web.Response):
            return body
        try:
            heartbeat, token = decode_heartbeat(body, max_bytes=self.config.max_frame_bytes)
        except HeartbeatError as exc:
            return self._bad_request(exc.reason, exc.field, exc.detail)
        if token is not None:
            detail = "send the token in the Authorization header"
            return self._bad_request(RejectReason.BAD_FIELD, "token", detail)
        if not self._authorized(heartbeat, bearer):
            return self._refuse(401, RejectReason.UNAUTHORIZED)
        return self._enqueue(_Job(heartbeat, received_at_s, started_perf_s))

    def _precheck(self, request: web.Request) -> web.Response | None:
        if self._shutting_down:
            return self._refuse(503, RejectReason.SHUTTING_DOWN)
        length = request.content_length
        if length is not None and length > self.config.max_frame_bytes:
            return self._refuse(413, RejectReason.TOO_LARGE)
        return None

    async def _read_body(self, request: web.Request) -> bytes | web.Response:
        try:
            async with asyncio.timeout(self.config.body_timeout_s):
                body = await _read_bounded(request.content, self.config.max_frame_bytes)
        except TimeoutError:
            return self._refuse(408, RejectReason.TIMEOUT, close=True)
        except web.RequestPayloadError:
            return self._bad_request(RejectReason.BAD_JSON, None, "malformed request body")
        if body is None:
            return self._refuse(413, RejectReason.TOO_LARGE)
        return body

    def _authorized(self, heartbeat: Heartbeat, bearer: str) -> bool:
        identity = self.directory.identity(heartbeat.agent_id)
        if identity is None:
            return self.config.allow_unmanaged
        return tokens_match(bearer, identity.token)

    def _enqueue(self, job: _Job) -> web.Response:
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            response = self._refuse(429, RejectReason.BUSY)
            response.headers["Retry-After"] = str(self.config.retry_after_s)
            return response
        self.counters.accepted += 1
        return web.Response(status=202, body=_ACCEPTED, content_type=_JSON)

    async def _get_stats(self, request: web.Request) -> web.Response:
        if not _is_loopback(request.remote):
            return web.Response(status=403, body=b'{"error":"forbidden"}', content_type=_JSON)
        return web.Response(
            status=200, body=msgspec.json.encode(self.stats_document()), content_type=_JSON
        )

    def stats_document(self) -> dict[str, object]:
        """What ``GET /stats`` answers: this transport's counters plus every transport's."""
        snapshot = self.stats.snapshot()
        http = snapshot.get(Transport.HTTP)
        return {
            "received": http.received,
            "accepted": http.accepted,
            "rejected": dict(http.rejected),
            "rejected_total": http.rejected_total,
            "recorded": http.recorded,
            "sink_errors": http.sink_errors,
            "queue_depth": self.queue.qsize(),
            "queue_capacity": self.config.queue_size,
            "avg_latency_ms": round(http.average_latency_s * 1000.0, 3),
            "transports": {
                str(t): {
                    "received": s.received,
                    "accepted": s.accepted,
                    "rejected": dict(s.rejected),
                }
                for t, s in snapshot.transports.items()
            },
        }

    # -- answers -------------------------------------------------------------------

    def _refuse(self, status: int, reason: RejectReason, *, close: bool = False) -> web.Response:
        self.counters.reject(reason)
        body = msgspec.json.encode({"error": reason})
        response = web.Response(status=status, body=body, content_type=_JSON)
        if close:
            response.force_close()
        return response

    def _bad_request(self, reason: RejectReason, field: str | None, detail: str) -> web.Response:
        self.counters.reject(reason)
        body = msgspec.json.encode({"error": reason, "field": field, "detail": detail})
        return web.Response(status=400, body=body, content_type=_JSON)

    # -- workers -------------------------------------------------------------------

    async def _work(self) -> None:
        queue, counters = self.queue, self.counters
        while True:
            job = await queue.get()
            try:
                self.sink.record(job.heartbeat, received_at_s=job.received_at_s, transport="http")
            except Exception:
                _log.exception("heartbeat sink failed", extra={"agent_id": job.heartbeat.agent_id})
                counters.sink_errors += 1
            else:
                counters.recorded += 1
                counters.record_latency_s_total += time.perf_counter() - job.started_perf_s
            finally:
                queue.task_done()


async def _read_bounded(stream: StreamReader, limit: int) -> bytes | None:
    """The whole body, or None as soon as it exceeds ``limit`` (never reads more)."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await stream.read(limit + 1 - size):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _bearer_token(header: str | None) -> str | None:
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _is_loopback(remote: str | None) -> bool:
    if remote is None:
        return False
    try:
        return ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False
