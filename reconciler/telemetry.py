"""Tracing and RPC metrics for every reconciler process, set up in one place each.

- ``plan_export`` decides where spans go from ``TelemetrySettings`` and the standard
  ``OTEL_*`` variables (a pure function); ``setup_tracing`` builds a ``TracerProvider``
  with the resource attributes (service name and version, node id) and a bounded
  batch processor, and returns a ``Tracing`` handle (``shutdown()``, span counters).
- ``server_interceptors`` / ``client_interceptors`` return the grpc.aio interceptors
  a process adds to each server and channel: one span per RPC (standard ``rpc.*``
  attributes and status, W3C trace context in the metadata, health checks left out)
  and RPC counts and latency histograms by method and code (``RpcStats``).
- ``MetricsEndpoint`` serves one ``CollectorRegistry`` on ``/metrics`` (aiohttp, on
  the process's event loop, so collectors read state without locks).

Why our own interceptors and batch processor instead of the contrib ones: the
opentelemetry-instrumentation-grpc interceptors wrap every servicer context in a proxy
object and parse the peer address on every call; on grpc.aio they cost about twice as
much throughput as one plain span (``bench/tracing_overhead.py`` measures both). The
SDK's ``BatchSpanProcessor`` logs a warning for each span it drops when its queue is
full, which puts a log write on the RPC path exactly when the collector is away, and
exposes no drop count without a metrics pipeline. ``BoundedBatchSpanProcessor`` drops
silently and counts.

What not: no spans on the heartbeat path (DESIGN section 9), no exporter for metrics
(Prometheus scrapes), no process-specific collectors (``reconciler.daemon.metrics``,
the Manager's app).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import enum
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import grpc
from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Setter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from reconciler.config import TelemetryExporter, TelemetrySettings, parse_host_port
from reconciler.rpc import WrappingInterceptor

__all__ = [
    "RPC_LATENCY_BUCKETS_S",
    "UNTRACED_SERVICES",
    "BoundedBatchSpanProcessor",
    "ExportPlan",
    "MetricsEndpoint",
    "RpcStats",
    "Side",
    "SpanCounters",
    "Tracing",
    "TracingCollector",
    "client_interceptors",
    "plan_export",
    "server_interceptors",
    "setup_tracing",
]

log = logging.getLogger(__name__)

#: Latency buckets of the RPC histograms, in seconds (0.5 ms to 10 s).
RPC_LATENCY_BUCKETS_S: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

#: Services that get no spans (probes call them every few seconds); they are counted.
UNTRACED_SERVICES: Final = frozenset({"grpc.health.v1.Health"})

#: Server spans end in ERROR only for these codes (OpenTelemetry RPC conventions);
#: e.g. NOT_FOUND is a correct answer from a server's point of view.
_SERVER_ERROR_CODES: Final = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

_OTLP_DEFAULT_ENDPOINT: Final = "http://localhost:4317"


# ------------------------------------------------------------------------ export plan


@dataclass(frozen=True, slots=True)
class ExportPlan:
    """Where spans go: ``exporter`` none|otlp|console, and the OTLP endpoint."""

    exporter: TelemetryExporter
    endpoint: str = ""
    insecure: bool = False


def plan_export(settings: TelemetrySettings, environ: Mapping[str, str]) -> ExportPlan:
    """The export the settings and ``OTEL_*`` variables ask for.

    ``OTEL_SDK_DISABLED=true`` wins over everything. An exporter named in the settings
    wins over ``OTEL_TRACES_EXPORTER``; the settings' endpoint wins over
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` and ``OTEL_EXPORTER_OTLP_ENDPOINT``. An
    ``http://`` endpoint is plaintext, ``https://`` uses TLS. Unknown exporter names
    in the environment mean none (and are logged).
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ExportPlan(TelemetryExporter.NONE)
    exporter = settings.exporter
    if exporter is TelemetryExporter.NONE:
        exporter = _exporter_from_env(environ.get("OTEL_TRACES_EXPORTER", ""))
    if exporter is not TelemetryExporter.OTLP:
        return ExportPlan(exporter)
    endpoint = (
        settings.otlp_endpoint
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "")
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
        or _OTLP_DEFAULT_ENDPOINT
    ).strip()
    scheme = urlsplit(endpoint).scheme
    insecure = scheme == "http" or (
        scheme not in ("http", "https")
        and environ.get("OTEL_EXPORTER_OTLP_INSECURE", "").strip().lower() == "true"
    )
    return ExportPlan(exporter, endpoint=endpoint, insecure=insecure)


def _exporter_from_env(value: str) -> TelemetryExporter:
    first = value.split(",")[0].strip().lower()
    if not first:
        return TelemetryExporter.NONE
    try:
        return TelemetryExporter(first)
    except ValueError:
        log.warning("OTEL_TRACES_EXPORTER=%r is not one of none, otlp, console: none", value)
        return TelemetryExporter.NONE


# ------------------------------------------------------------------- span processor


class SpanCounters:
    """What happened to ended spans: plain ints, written by the processor."""

    __slots__ = ("dropped_queue_full", "export_failed", "exported")

    def __init__(self) -> None:
        self.exported = 0
        self.dropped_queue_full = 0
        self.export_failed = 0


class BoundedBatchSpanProcessor(SpanProcessor):
    """Queue ended spans (bounded, newest kept) and export them in batches on a thread.

    ``on_end`` never blocks and never logs: when the queue is full the oldest span is
    dropped and counted. The exporter runs on a worker thread every ``delay_s`` or
    as soon as a batch is full; spans it fails to export are counted too.
    """

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        max_queue: int = 2048,
        max_batch: int = 512,
        delay_s: float = 1.0,
        counters: SpanCounters | None = None,
    ) -> None:
        self._exporter = exporter
        self._queue: collections.deque[ReadableSpan] = collections.deque(maxlen=max_queue)
        self._max_queue = max_queue
        self._max_batch = max_batch
        self._delay_s = delay_s
        self.counters = counters or SpanCounters()
        self._wake = threading.Event()
        self._idle = threading.Condition()
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="span-export", daemon=True)
        self._thread.start()

    def on_start(self, span: Any, parent_context: otel_context.Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        if self._closed or not span.context or not span.context.trace_flags.sampled:
            return
        if len(self._queue) >= self._max_queue:
            self.counters.dropped_queue_full += 1
        self._queue.append(span)
        if len(self._queue) >= self._max_batch:
            self._wake.set()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self._delay_s)
            self._wake.clear()
            self._drain()
        self._drain()

    def _drain(self) -> None:
        with self._idle:
            self._busy = True
        try:
            while self._queue:
                batch = [
                    self._queue.popleft() for _ in range(min(self._max_batch, len(self._queue)))
                ]
                self._export(batch)
        finally:
            with self._idle:
                self._busy = False
                self._idle.notify_all()

    def _export(self, batch: list[ReadableSpan]) -> None:
        token = otel_context.attach(
            otel_context.set_value(otel_context._SUPPRESS_INSTRUMENTATION_KEY, True)
        )
        try:
            result = self._exporter.export(batch)
        except Exception:
            log.debug("span export raised", exc_info=True)
            result = SpanExportResult.FAILURE
        finally:
            otel_context.detach(token)
        if result is SpanExportResult.SUCCESS:
            self.counters.exported += len(batch)
        else:
            self.counters.export_failed += len(batch)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Export what is queued now; True when it finished within the timeout."""
        deadline = time.monotonic() + timeout_millis / 1000
        self._wake.set()
        with self._idle:
            while self._queue or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._wake.set()
                self._idle.wait(min(remaining, 0.05))
        return True

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Export what is left, waiting at most ``timeout_s`` (then what is still
        queued is lost), and stop."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=timeout_s)
        self._exporter.shutdown()  # also cuts short an export still retrying


# --------------------------------------------------------------------------- tracing


class Tracing:
    """The handle ``setup_tracing`` returns: the provider (or none) and its counters."""

    def __init__(
        self,
        provider: TracerProvider | None,
        *,
        plan: ExportPlan,
        counters: SpanCounters,
        owns_global: bool = False,
        processor: BoundedBatchSpanProcessor | None = None,
    ) -> None:
        self.provider = provider
        self.plan = plan
        self.counters = counters
        self._owns_global = owns_global
        self._processor = processor

    @property
    def enabled(self) -> bool:
        """True when spans are recorded and exported."""
        return self.provider is not None

    def tracer(self, name: str) -> trace.Tracer | None:
        """A tracer of this provider, or None when tracing is off."""
        return self.provider.get_tracer(name) if self.provider is not None else None

    def force_flush(self, timeout_s: float = 5.0) -> bool:
        """Export every ended span now (tests and benchmarks)."""
        if self.provider is None:
            return True
        return self.provider.force_flush(int(timeout_s * 1000))

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Export what is left (waiting at most ``timeout_s``) and stop the export
        thread; idempotent."""
        if self._processor is not None:
            self._processor.shutdown(timeout_s)
        if self.provider is not None:
            self.provider.shutdown()

    @classmethod
    def disabled(cls) -> Tracing:
        """Tracing off: no provider, counters stay zero."""
        return cls(None, plan=ExportPlan(TelemetryExporter.NONE), counters=SpanCounters())


def setup_tracing(
    settings: TelemetrySettings,
    *,
    service_name: str,
    node_id: str | None = None,
    version: str,
    environ: Mapping[str, str] | None = None,
    install_global: bool = True,
    max_queue: int = 2048,
    counters: SpanCounters | None = None,
) -> Tracing:
    """Build the tracer provider the settings ask for; ``Tracing.disabled()`` for none.

    With ``install_global`` the provider becomes OpenTelemetry's global one (so spans
    made with ``trace.get_tracer`` anywhere in the process go to it) unless another
    SDK provider was installed first; a second app in the same process (dev mode)
    should share the first handle instead of calling this again. ``counters`` lets
    a metrics collector made before tracing is set up read the span counts.
    """
    plan = plan_export(settings, os.environ if environ is None else environ)
    if plan.exporter is TelemetryExporter.NONE:
        return Tracing.disabled()
    attributes: dict[str, str] = {"service.name": service_name, "service.version": version}
    if node_id:
        attributes["reconciler.node.id"] = node_id
    provider = TracerProvider(resource=Resource.create(attributes))
    counters = counters if counters is not None else SpanCounters()
    processor = BoundedBatchSpanProcessor(_exporter(plan), max_queue=max_queue, counters=counters)
    provider.add_span_processor(processor)
    owns_global = install_global and _install_global(provider)
    log.info(
        "tracing: exporting spans (%s%s)",
        plan.exporter,
        f" to {plan.endpoint}" if plan.endpoint else "",
        extra={"service": service_name},
    )
    return Tracing(
        provider, plan=plan, counters=counters, owns_global=owns_global, processor=processor
    )


def _exporter(plan: ExportPlan) -> SpanExporter:
    if plan.exporter is TelemetryExporter.CONSOLE:
        return ConsoleSpanExporter(service_name=None)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=plan.endpoint, insecure=plan.insecure, timeout=5)


def _install_global(provider: TracerProvider) -> bool:
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        log.debug("a tracer provider is already installed; keeping it as the global one")
        return False
    trace.set_tracer_provider(provider)
    return True


class TracingCollector(Collector):
    """``reconciler_trace_spans_*_total``: exported, dropped (queue full), failed export."""

    def __init__(self, counters: SpanCounters) -> None:
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        counters = self._counters
        exported = CounterMetricFamily(
            "reconciler_trace_spans_exported", "Spans the exporter accepted."
        )
        exported.add_metric([], counters.exported)
        dropped = CounterMetricFamily(
            "reconciler_trace_spans_dropped",
            "Spans lost: queue_full (the exporter could not keep up) or export_failed.",
            labels=["reason"],
        )
        dropped.add_metric(["queue_full"], counters.dropped_queue_full)
        dropped.add_metric(["export_failed"], counters.export_failed)
        yield exported
        yield dropped


# ----------------------------------------------------------------------- RPC metrics


class Side(enum.StrEnum):
    """Which end of an RPC a ``RpcStats`` counts."""

    SERVER = "server"
    CLIENT = "client"


class _Histogram:
    __slots__ = ("buckets", "count", "total_s")

    def __init__(self, size: int) -> None:
        self.buckets = [0] * size
        self.count = 0
        self.total_s = 0.0


class RpcStats(Collector):
    """RPC counts by (service, method, code) and latency by method: plain ints on the
    hot path, turned into ``reconciler_grpc_{side}_handled_total`` and
    ``reconciler_grpc_{side}_handling_seconds`` at scrape time."""

    def __init__(self, side: Side, *, buckets_s: Sequence[float] = RPC_LATENCY_BUCKETS_S) -> None:
        self.side = side
        self._bounds = tuple(buckets_s)
        self._handled: dict[tuple[str, str, str], int] = {}
        self._latency: dict[tuple[str, str], _Histogram] = {}

    def observe(self, service: str, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """Count one finished RPC."""
        key = (service, method, code.name)
        self._handled[key] = self._handled.get(key, 0) + 1
        histogram = self._latency.get((service, method))
        if histogram is None:
            histogram = self._latency[(service, method)] = _Histogram(len(self._bounds) + 1)
        histogram.buckets[bisect.bisect_left(self._bounds, seconds)] += 1
        histogram.count += 1
        histogram.total_s += seconds

    def handled(self, service: str, method: str, code: grpc.StatusCode) -> int:
        """How many RPCs of ``method`` ended with ``code``."""
        return self._handled.get((service, method, code.name), 0)

    def collect(self) -> Iterator[Metric]:
        side = self.side
        handled = CounterMetricFamily(
            f"reconciler_grpc_{side}_handled",
            f"RPCs completed on the {side} side, by method and status code.",
            labels=["grpc_service", "grpc_method", "grpc_code"],
        )
        for (service, method, code), count in sorted(self._handled.items()):
            handled.add_metric([service, method, code], count)
        latency = HistogramMetricFamily(
            f"reconciler_grpc_{side}_handling_seconds",
            f"Time from receiving an RPC to its status, on the {side} side.",
            labels=["grpc_service", "grpc_method"],
        )
        for (service, method), hist in sorted(self._latency.items()):
            latency.add_metric([service, method], self._cumulative(hist), sum_value=hist.total_s)
        yield handled
        yield latency

    def _cumulative(self, hist: _Histogram) -> list[tuple[str, float]]:
        rows: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self._bounds, float("inf")), hist.buckets, strict=True):
            running += count
            rows.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return rows


# ---------------------------------------------------------------------- interceptors


@dataclass(frozen=True, slots=True)
class _Method:
    """What is computed once per full method name ("/pkg.Service/Method")."""

    service: str
    method: str
    span_name: str
    attributes: Mapping[str, Any]
    traced: bool


def _describe(full_method: str | bytes) -> _Method:
    text = full_method.decode() if isinstance(full_method, bytes) else full_method
    service, _, method = text.lstrip("/").partition("/")
    return _Method(
        service=service,
        method=method,
        span_name=f"{service}/{method}",
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
        traced=service not in UNTRACED_SERVICES,
    )


class _Methods:
    """A small cache of ``_describe`` (method names are few and fixed)."""

    def __init__(self) -> None:
        self._known: dict[str | bytes, _Method] = {}

    def __call__(self, full_method: str | bytes) -> _Method:
        found = self._known.get(full_method)
        if found is None:
            if len(self._known) > 1000:  # unknown methods from a hostile client
                return _describe(full_method)
            found = self._known[full_method] = _describe(full_method)
        return found


def _end_span(span: trace.Span, code: grpc.StatusCode, *, server: bool, details: str) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK and (not server or code in _SERVER_ERROR_CODES):
        span.set_status(Status(StatusCode.ERROR, details or code.name))
    span.end()


class _ServerInterceptor(WrappingInterceptor):
    """One span and one count per RPC, around everything else on the server."""

    def __init__(self, *, tracer: trace.Tracer | None, stats: RpcStats | None) -> None:
        super().__init__()
        self._tracer = tracer
        self._stats = stats

    def wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        return self._wrap(handler, _describe(method))

    def _wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], described: _Method
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(described, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(described, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _start(self, described: _Method, context: Any) -> tuple[trace.Span | None, object]:
        if self._tracer is None or not described.traced:
            return None, None
        parent = _extract(context.invocation_metadata())
        span = self._tracer.start_span(
            described.span_name,
            context=parent,
            kind=SpanKind.SERVER,
            attributes=described.attributes,
        )
        return span, otel_context.attach(trace.set_span_in_context(span, parent))

    def _finish(
        self,
        described: _Method,
        context: Any,
        started: float,
        span: trace.Span | None,
        token: object,
        code: grpc.StatusCode | None,
    ) -> None:
        final = code or context.code() or grpc.StatusCode.OK
        if self._stats is not None:
            self._stats.observe(
                described.service, described.method, final, time.perf_counter() - started
            )
        if span is not None:
            otel_context.detach(token)  # type: ignore[arg-type]
            _end_span(span, final, server=True, details=context.details() or "")

    def _unary(self, described: _Method, behaviour: Any) -> Any:
        async def call(request: Any, context: Any) -> Any:
            started = time.perf_counter()
            span, token = self._start(described, context)
            code: grpc.StatusCode | None = None
            try:
                return await behaviour(request, context)
            except BaseException as error:
                code = _server_code(error, context)
                raise
            finally:
                self._finish(described, context, started, span, token, code)

        return call

    def _stream(self, described: _Method, behaviour: Any) -> Any:
        async def call(request: Any, context: Any) -> AsyncIterator[Any]:
            started = time.perf_counter()
            span, token = self._start(described, context)
            code: grpc.StatusCode | None = None
            try:
                async for item in behaviour(request, context):
                    yield item
            except BaseException as error:
                code = _server_code(error, context)
                raise
            finally:
                self._finish(described, context, started, span, token, code)

        return call


def _server_code(error: BaseException, context: Any) -> grpc.StatusCode:
    code = context.code()
    if code is not None:
        return code  # type: ignore[no-any-return]
    if isinstance(error, (GeneratorExit, asyncio.CancelledError)):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def _extract(metadata: Sequence[Any] | None) -> otel_context.Context | None:
    if not metadata:
        return None
    carrier = {key: value for key, value in metadata if isinstance(value, str)}
    if "traceparent" not in carrier:
        return None
    return propagate.extract(carrier)


class _ClientBase:
    def __init__(self, *, tracer: trace.Tracer | None, stats: RpcStats | None) -> None:
        self._tracer = tracer
        self._stats = stats
        self._methods = _Methods()

    def _begin(
        self, details: grpc.aio.ClientCallDetails
    ) -> tuple[_Method, trace.Span | None, grpc.aio.ClientCallDetails]:
        described = self._methods(details.method)
        if self._tracer is None or not described.traced:
            return described, None, details
        span = self._tracer.start_span(
            described.span_name, kind=SpanKind.CLIENT, attributes=described.attributes
        )
        metadata = grpc.aio.Metadata(*tuple(details.metadata or ()))
        propagate.inject(metadata, context=trace.set_span_in_context(span), setter=_SETTER)
        new_details = grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )
        return described, span, new_details

    def _done(
        self,
        described: _Method,
        span: trace.Span | None,
        started: float,
        code: grpc.StatusCode,
        details: str,
    ) -> None:
        if self._stats is not None:
            self._stats.observe(
                described.service, described.method, code, time.perf_counter() - started
            )
        if span is not None:
            _end_span(span, code, server=False, details=details)


class _MetadataSetter(Setter[grpc.aio.Metadata]):
    def set(self, carrier: grpc.aio.Metadata, key: str, value: str) -> None:
        carrier[key] = value


_SETTER: Final = _MetadataSetter()


class _UnaryUnaryClient(_ClientBase, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        started = time.perf_counter()
        described, span, details = self._begin(client_call_details)
        code, message = grpc.StatusCode.UNKNOWN, ""
        try:
            call = await continuation(details, request)
            code = await call.code()
            message = await call.details() or ""
            return call
        except grpc.aio.AioRpcError as error:
            code, message = error.code(), error.details() or ""
            raise
        except BaseException:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            self._done(described, span, started, code, message)


class _UnaryStreamClient(_ClientBase, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        started = time.perf_counter()
        described, span, details = self._begin(client_call_details)
        call = await continuation(details, request)
        return self._relay(call, described, span, started)

    async def _relay(
        self, call: Any, described: _Method, span: trace.Span | None, started: float
    ) -> AsyncIterator[Any]:
        code, message = grpc.StatusCode.OK, ""
        try:
            async for item in call:
                yield item
        except grpc.aio.AioRpcError as error:
            code, message = error.code(), error.details() or ""
            raise
        except BaseException:
            code = grpc.StatusCode.CANCELLED
            call.cancel()
            raise
        finally:
            self._done(described, span, started, code, message)


def server_interceptors(tracing: Tracing, stats: RpcStats | None = None) -> list[Any]:
    """The interceptors every grpc.aio server adds first: spans (when tracing is on)
    and RPC metrics (when ``stats`` is given)."""
    tracer = tracing.tracer("reconciler.rpc")
    if tracer is None and stats is None:
        return []
    return [_ServerInterceptor(tracer=tracer, stats=stats)]


def client_interceptors(tracing: Tracing, stats: RpcStats | None = None) -> list[Any]:
    """The interceptors every grpc.aio channel is created with: client spans that carry
    the trace context to the server (when tracing is on) and RPC metrics."""
    tracer = tracing.tracer("reconciler.rpc")
    if tracer is None and stats is None:
        return []
    return [
        _UnaryUnaryClient(tracer=tracer, stats=stats),
        _UnaryStreamClient(tracer=tracer, stats=stats),
    ]


# ------------------------------------------------------------------ metrics endpoint


class MetricsEndpoint:
    """Serves ``registry`` as Prometheus text on ``http://listen/metrics``."""

    def __init__(self, registry: CollectorRegistry, listen: str) -> None:
        self.registry = registry
        self._host, self._port = parse_host_port(listen)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        await site.start()
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    @property
    def address(self) -> str:
        host = self._host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
