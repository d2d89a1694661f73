"""reconciler.telemetry: export plans, the bounded batch processor, RPC interceptors
(spans, statuses, propagation, metrics) against a real grpc.aio server on port 0."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from reconciler import rpc
from reconciler.config import TelemetryExporter, TelemetrySettings
from reconciler.logs import JsonFormatter
from reconciler.model.errors import InvalidArgument
from reconciler.telemetry import (
    BoundedBatchSpanProcessor,
    ExportPlan,
    MetricsEndpoint,
    RpcStats,
    Side,
    SpanCounters,
    Tracing,
    TracingCollector,
    client_interceptors,
    plan_export,
    server_interceptors,
    setup_tracing,
)

OTLP = TelemetryExporter.OTLP
NONE = TelemetryExporter.NONE
CONSOLE = TelemetryExporter.CONSOLE


@pytest.mark.parametrize(
    ("settings", "environ", "expected"),
    [
        pytest.param(TelemetrySettings(), {}, ExportPlan(NONE), id="default-is-none"),
        pytest.param(
            TelemetrySettings(exporter=OTLP, otlp_endpoint="http://127.0.0.1:4317"),
            {},
            ExportPlan(OTLP, "http://127.0.0.1:4317", insecure=True),
            id="settings-otlp-http-is-plaintext",
        ),
        pytest.param(
            TelemetrySettings(exporter=OTLP, otlp_endpoint="https://collector:4317"),
            {},
            ExportPlan(OTLP, "https://collector:4317", insecure=False),
            id="https-uses-tls",
        ),
        pytest.param(
            TelemetrySettings(),
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://j:4317"},
            ExportPlan(OTLP, "http://j:4317", insecure=True),
            id="environment-when-settings-say-none",
        ),
        pytest.param(
            TelemetrySettings(exporter=OTLP, otlp_endpoint="http://a:1"),
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://b:2"},
            ExportPlan(OTLP, "http://a:1", insecure=True),
            id="settings-endpoint-wins",
        ),
        pytest.param(
            TelemetrySettings(exporter=OTLP),
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:3"},
            ExportPlan(OTLP, "http://t:3", insecure=True),
            id="traces-endpoint-variable",
        ),
        pytest.param(
            TelemetrySettings(exporter=OTLP),
            {},
            ExportPlan(OTLP, "http://localhost:4317", insecure=True),
            id="otlp-default-endpoint",
        ),
        pytest.param(
            TelemetrySettings(exporter=CONSOLE),
            {"OTEL_TRACES_EXPORTER": "otlp"},
            ExportPlan(CONSOLE),
            id="settings-exporter-wins",
        ),
        pytest.param(
            TelemetrySettings(exporter=OTLP, otlp_endpoint="http://a:1"),
            {"OTEL_SDK_DISABLED": "true"},
            ExportPlan(NONE),
            id="sdk-disabled-wins",
        ),
        pytest.param(
            TelemetrySettings(),
            {"OTEL_TRACES_EXPORTER": "zipkin"},
            ExportPlan(NONE),
            id="unknown-environment-exporter-is-none",
        ),
    ],
)
def test_the_export_plan_follows_settings_then_the_otel_variables(
    settings: TelemetrySettings, environ: dict[str, str], expected: ExportPlan
) -> None:
    assert plan_export(settings, environ) == expected


def test_tracing_set_to_none_builds_no_provider_and_no_interceptors() -> None:
    tracing = setup_tracing(TelemetrySettings(), service_name="s", version="1", environ={})
    assert not tracing.enabled
    assert server_interceptors(tracing) == []
    assert client_interceptors(tracing) == []
    tracing.shutdown()


def test_the_provider_carries_service_version_and_node_id() -> None:
    tracing = setup_tracing(
        TelemetrySettings(exporter=CONSOLE),
        service_name="reconciler-daemon",
        node_id="node-1",
        version="9.9",
        environ={},
        install_global=False,
    )
    assert tracing.provider is not None
    attributes = tracing.provider.resource.attributes
    assert attributes["service.name"] == "reconciler-daemon"
    assert attributes["service.version"] == "9.9"
    assert attributes["reconciler.node.id"] == "node-1"
    tracing.shutdown()


# ---------------------------------------------------------------------- processor


class _Gate(SpanExporter):
    """Blocks each export until released; then answers ``result``."""

    def __init__(self, result: SpanExportResult) -> None:
        self.result = result
        self.release = threading.Event()
        self.exported: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.release.wait(10)
        self.exported.extend(spans)
        return self.result

    def shutdown(self) -> None:
        self.release.set()


def _provider(processor: BoundedBatchSpanProcessor) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(processor)
    return provider


@pytest.mark.parametrize(
    ("result", "exported", "failed"),
    [
        pytest.param(SpanExportResult.SUCCESS, 8, 0, id="exporter-accepts"),
        pytest.param(SpanExportResult.FAILURE, 0, 8, id="exporter-fails"),
    ],
)
def test_a_full_queue_drops_the_oldest_spans_and_every_span_is_accounted_for(
    result: SpanExportResult, exported: int, failed: int
) -> None:
    exporter = _Gate(result)
    counters = SpanCounters()
    processor = BoundedBatchSpanProcessor(
        exporter, max_queue=8, max_batch=4, delay_s=60, counters=counters
    )
    tracer = _provider(processor).get_tracer("t")
    for i in range(20):
        tracer.start_span(f"s{i}").end()
    assert counters.dropped_queue_full >= 8
    exporter.release.set()
    processor.shutdown()
    total = counters.exported + counters.export_failed + counters.dropped_queue_full
    assert total == 20
    assert counters.exported >= exported
    assert counters.export_failed >= failed
    assert (counters.exported == 0) == (result is SpanExportResult.FAILURE)


def test_ending_a_span_never_waits_for_a_slow_exporter() -> None:
    exporter = _Gate(SpanExportResult.SUCCESS)
    processor = BoundedBatchSpanProcessor(exporter, max_queue=4, max_batch=1, delay_s=0.01)
    tracer = _provider(processor).get_tracer("t")
    for i in range(100):  # the exporter is blocked on the first batch all along
        tracer.start_span(f"s{i}").end()
    assert processor.counters.dropped_queue_full >= 90
    exporter.release.set()
    processor.shutdown()


def test_force_flush_exports_what_is_queued() -> None:
    exporter = InMemorySpanExporter()
    processor = BoundedBatchSpanProcessor(exporter, delay_s=60)
    provider = _provider(processor)
    provider.get_tracer("t").start_span("one").end()
    assert processor.force_flush(5000)
    assert [s.name for s in exporter.get_finished_spans()] == ["one"]
    assert processor.counters.exported == 1
    provider.shutdown()


# -------------------------------------------------------------------- interceptors

_SERVICE = "test.Echo"


class _Echo:
    def __init__(self) -> None:
        self.seen_span: trace.SpanContext | None = None
        self.log_line = ""

    async def ping(self, request: bytes, context: Any) -> bytes:
        self.seen_span = trace.get_current_span().get_span_context()
        record = logging.LogRecord("t", logging.INFO, "", 0, "inside", None, None)
        self.log_line = JsonFormatter().format(record)
        if request == b"bad":
            raise InvalidArgument("payload", "must not be bad")
        if request == b"boom":
            raise RuntimeError("boom")
        return request

    async def count(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        for i in range(3):
            yield str(i).encode()

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            _SERVICE,
            {
                "Ping": grpc.unary_unary_rpc_method_handler(self.ping),
                "Count": grpc.unary_stream_rpc_method_handler(self.count),
            },
        )


class _Stack:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider()
        self.processor = BoundedBatchSpanProcessor(self.exporter, delay_s=60)
        provider.add_span_processor(self.processor)
        self.tracing = Tracing(provider, plan=ExportPlan(OTLP), counters=self.processor.counters)
        self.server_stats = RpcStats(Side.SERVER)
        self.client_stats = RpcStats(Side.CLIENT)
        self.echo = _Echo()

    def spans(self) -> dict[str, ReadableSpan]:
        self.processor.force_flush(5000)
        return {f"{s.kind.name}:{s.name}": s for s in self.exporter.get_finished_spans()}


@pytest.fixture
async def stack() -> AsyncIterator[tuple[_Stack, grpc.aio.Channel]]:
    parts = _Stack()
    server = grpc.aio.server(
        interceptors=[
            *server_interceptors(parts.tracing, parts.server_stats),
            rpc.ErrorInterceptor(),
        ]
    )
    server.add_generic_rpc_handlers((parts.echo.handler(),))
    health = rpc.add_standard_services(server, [_SERVICE])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await rpc.set_serving(health, [_SERVICE], serving=True)
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", interceptors=client_interceptors(parts.tracing, parts.client_stats)
    )
    yield parts, channel
    await channel.close()
    await server.stop(None)
    parts.tracing.shutdown()


async def test_a_call_makes_a_client_span_and_its_child_server_span_with_rpc_attributes(
    stack: tuple[_Stack, grpc.aio.Channel],
) -> None:
    parts, channel = stack
    assert await channel.unary_unary(f"/{_SERVICE}/Ping")(b"hi") == b"hi"
    spans = parts.spans()
    client, server = spans["CLIENT:test.Echo/Ping"], spans["SERVER:test.Echo/Ping"]
    assert server.parent is not None
    assert server.parent.span_id == client.context.span_id
    assert server.context.trace_id == client.context.trace_id
    assert server.attributes == {
        "rpc.system": "grpc",
        "rpc.service": "test.Echo",
        "rpc.method": "Ping",
        "rpc.grpc.status_code": 0,
    }
    assert server.status.status_code is trace.StatusCode.UNSET
    assert parts.echo.seen_span is not None
    assert parts.echo.seen_span.span_id == server.context.span_id, "the servicer runs in it"


async def test_log_records_inside_an_rpc_carry_its_trace_and_span_ids(
    stack: tuple[_Stack, grpc.aio.Channel],
) -> None:
    parts, channel = stack
    await channel.unary_unary(f"/{_SERVICE}/Ping")(b"hi")
    server = parts.spans()["SERVER:test.Echo/Ping"]
    assert f'"trace_id": "{server.context.trace_id:032x}"' in parts.echo.log_line
    assert f'"span_id": "{server.context.span_id:016x}"' in parts.echo.log_line


@pytest.mark.parametrize(
    ("payload", "code", "server_error"),
    [
        pytest.param(b"bad", grpc.StatusCode.INVALID_ARGUMENT, False, id="caller-error"),
        pytest.param(b"boom", grpc.StatusCode.INTERNAL, True, id="server-error"),
    ],
)
async def test_a_failed_call_records_its_code_and_an_error_status_where_it_is_one(
    stack: tuple[_Stack, grpc.aio.Channel],
    payload: bytes,
    code: grpc.StatusCode,
    server_error: bool,
) -> None:
    parts, channel = stack
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await channel.unary_unary(f"/{_SERVICE}/Ping")(payload)
    assert raised.value.code() is code
    # An aborted call's status reaches the client before the server interceptor's
    # ``finally`` has run; wait for that, not for any time.
    for _ in range(500):
        if parts.server_stats.handled("test.Echo", "Ping", code):
            break
        await asyncio.sleep(0.01)
    spans = parts.spans()
    server, client = spans["SERVER:test.Echo/Ping"], spans["CLIENT:test.Echo/Ping"]
    assert server.attributes is not None
    assert client.attributes is not None
    assert server.attributes["rpc.grpc.status_code"] == code.value[0]
    assert client.attributes["rpc.grpc.status_code"] == code.value[0]
    assert client.status.status_code is trace.StatusCode.ERROR
    expected = trace.StatusCode.ERROR if server_error else trace.StatusCode.UNSET
    assert server.status.status_code is expected
    assert parts.server_stats.handled("test.Echo", "Ping", code) == 1
    assert parts.client_stats.handled("test.Echo", "Ping", code) == 1


async def test_a_server_stream_is_one_span_from_request_to_last_message(
    stack: tuple[_Stack, grpc.aio.Channel],
) -> None:
    parts, channel = stack
    items = [item async for item in channel.unary_stream(f"/{_SERVICE}/Count")(b"")]
    assert items == [b"0", b"1", b"2"]
    spans = parts.spans()
    assert "SERVER:test.Echo/Count" in spans
    assert "CLIENT:test.Echo/Count" in spans
    assert parts.server_stats.handled("test.Echo", "Count", grpc.StatusCode.OK) == 1
    assert parts.client_stats.handled("test.Echo", "Count", grpc.StatusCode.OK) == 1


async def test_health_checks_are_counted_but_not_traced(
    stack: tuple[_Stack, grpc.aio.Channel],
) -> None:
    parts, channel = stack
    answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    await channel.unary_unary(f"/{_SERVICE}/Ping")(b"hi")
    assert not [name for name in parts.spans() if "Health" in name]
    assert parts.server_stats.handled("grpc.health.v1.Health", "Check", grpc.StatusCode.OK) == 1


async def test_rpc_metrics_and_span_counters_are_valid_prometheus_text(
    stack: tuple[_Stack, grpc.aio.Channel],
) -> None:
    parts, channel = stack
    for _ in range(3):
        await channel.unary_unary(f"/{_SERVICE}/Ping")(b"hi")
    registry = CollectorRegistry(auto_describe=False)
    for collector in (
        parts.server_stats,
        parts.client_stats,
        TracingCollector(parts.tracing.counters),
    ):
        registry.register(collector)
    endpoint = MetricsEndpoint(registry, "127.0.0.1:0")
    await endpoint.start()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{endpoint.address}/metrics") as answer,
        ):
            text = await answer.text()
    finally:
        await endpoint.stop()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    ping = (("grpc_code", "OK"), ("grpc_method", "Ping"), ("grpc_service", "test.Echo"))
    assert samples[("reconciler_grpc_server_handled_total", ping)] == 3
    assert samples[("reconciler_grpc_client_handled_total", ping)] == 3
    count_key = (("grpc_method", "Ping"), ("grpc_service", "test.Echo"))
    assert samples[("reconciler_grpc_server_handling_seconds_count", count_key)] == 3
    inf_key = (*count_key[:1], *count_key[1:], ("le", "+Inf"))
    assert samples[("reconciler_grpc_server_handling_seconds_bucket", tuple(sorted(inf_key)))] == 3
    assert ("reconciler_trace_spans_dropped_total", (("reason", "queue_full"),)) in samples


def test_rpc_stats_buckets_are_cumulative() -> None:
    stats = RpcStats(Side.SERVER, buckets_s=(0.1, 1.0))
    for seconds in (0.05, 0.5, 5.0):
        stats.observe("s", "m", grpc.StatusCode.OK, seconds)
    [_, histogram] = list(stats.collect())
    buckets = {s.labels["le"]: s.value for s in histogram.samples if s.name.endswith("_bucket")}
    assert buckets == {"0.1": 1, "1.0": 2, "+Inf": 3}
