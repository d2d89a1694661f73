"""A real OTLP/gRPC trace collector for tests and benchmarks.

``OtlpCollector`` serves ``opentelemetry.proto.collector.trace.v1.TraceService`` with
grpc.aio on 127.0.0.1 (port 0) from its own event loop in a background thread, so
sync tests, async tests and child processes can all export to it. It keeps every span
it receives as a ``CollectedSpan`` (hex ids, parent id, service name from the resource,
attributes, event names) and offers ``wait_for`` to poll for a condition.

Run as a process (the benchmark does): ``python -m tests.support.otlp_collector``
prints ``port N`` and then counts spans without keeping them.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2

__all__ = ["CollectedSpan", "OtlpCollector"]


@dataclass(frozen=True)
class CollectedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    service: str
    attributes: dict[str, Any] = field(default_factory=dict)
    resource: dict[str, Any] = field(default_factory=dict)
    events: tuple[str, ...] = ()
    status_code: int = 0

    @property
    def is_root(self) -> bool:
        return not self.parent_span_id


def _value(any_value: common_pb2.AnyValue) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def _attributes(pairs: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def _flatten(request: trace_service_pb2.ExportTraceServiceRequest) -> list[CollectedSpan]:
    spans = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    CollectedSpan(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        name=span.name,
                        kind=span.kind,
                        service=str(resource.get("service.name", "")),
                        attributes=_attributes(span.attributes),
                        resource=resource,
                        events=tuple(event.name for event in span.events),
                        status_code=span.status.code,
                    )
                )
    return spans


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, collector: OtlpCollector) -> None:
        self._collector = collector

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self._collector.receive(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpCollector:
    """An OTLP/gRPC trace receiver on 127.0.0.1:<port>, running on its own thread."""

    def __init__(self, *, keep: bool = True) -> None:
        self._keep = keep
        self._lock = threading.Lock()
        self._spans: list[CollectedSpan] = []
        self.count = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: grpc.aio.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpCollector:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    async def _start(self) -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(0), self._loop).result(timeout=10)
            self._server = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> OtlpCollector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def receive(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        spans = _flatten(request) if self._keep else []
        with self._lock:
            self.count += sum(
                len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans
            )
            self._spans.extend(spans)

    def spans(self) -> list[CollectedSpan]:
        with self._lock:
            return list(self._spans)

    def trace(self, trace_id: str) -> list[CollectedSpan]:
        return [span for span in self.spans() if span.trace_id == trace_id]

    def wait_for(
        self,
        condition: Callable[[list[CollectedSpan]], Any],
        *,
        timeout_s: float = 30.0,
        what: str = "",
    ) -> Any:
        """Poll ``condition(spans)`` until it is truthy; fail after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = condition(self.spans())
            if found:
                return found
            time.sleep(0.05)
        names = sorted({(s.service, s.name) for s in self.spans()})
        raise AssertionError(f"timed out waiting for {what or condition}; spans: {names}")


def main() -> None:
    collector = OtlpCollector(keep=False).start()
    print(f"port {collector.port}", flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "count":
                print(f"count {collector.count}", flush=True)
    finally:
        collector.stop()


if __name__ == "__main__":
    main()
