"""What tracing costs an RPC: throughput and p99 with tracing off and on, in one run.

What: one grpc.aio server in this process and an untraced caller in a child process
(so the server's CPU per RPC is measured alone), an echo method taking and returning
64 bytes, ``concurrency`` callers for ``seconds`` per round; each call carries a
sampled ``traceparent``, as a call from a traced peer does. The variants run in
interleaved rounds so drift on a shared machine hits them alike, and the median round
counts:

- ``off``: no interceptors at all;
- ``metrics``: ``reconciler.telemetry`` interceptors with RPC metrics, tracing off
  (what a process runs with the default ``telemetry.exporter: none``);
- ``lean``: the same with tracing on, batch export over OTLP/gRPC to a collector in
  another process (``tests/support/otlp_collector.py``);
- ``contrib``: opentelemetry-instrumentation-grpc's aio interceptors, same provider.

``run()`` returns RPC/s and p99 of each and the throughput ratios to ``off``; the goal
is ``lean`` >= 0.85 (tracing costs at most 15%).
Run it as ``python -m bench.tracing_overhead [--seconds S] [--rounds N]``.

What not: no network between the ends (loopback), no real servicer work, no TLS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.instrumentation.grpc import filters as otel_filters

from reconciler.config import TelemetryExporter, TelemetrySettings
from reconciler.telemetry import (
    RpcStats,
    Side,
    Tracing,
    server_interceptors,
    setup_tracing,
)

__all__ = ["main", "run"]

_ROOT = Path(__file__).resolve().parent.parent
_METHOD = "/bench.Echo/Ping"
_PAYLOAD = b"x" * 64


def _echo_handler() -> grpc.GenericRpcHandler:
    async def ping(request: bytes, context: Any) -> bytes:
        return request

    return grpc.method_handlers_generic_handler(
        "bench.Echo", {"Ping": grpc.unary_unary_rpc_method_handler(ping)}
    )


_TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def _load(port: int, *, seconds: float, concurrency: int) -> dict[str, float]:
    """The caller side (a child process): ``concurrency`` loops for ``seconds``."""
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    ping = channel.unary_unary(_METHOD)
    metadata = (("traceparent", _TRACEPARENT),)
    latencies: list[float] = []
    for _ in range(50):  # warm up the connection and the server's caches
        await ping(_PAYLOAD, metadata=metadata)
    end = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < end:
            started = time.perf_counter()
            await ping(_PAYLOAD, timeout=10, metadata=metadata)
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    await channel.close()
    latencies.sort()
    return {
        "calls": len(latencies),
        "rps": len(latencies) / elapsed,
        "p99_ms": latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000,
    }


async def _round(interceptors: list[Any], *, seconds: float, concurrency: int) -> dict[str, float]:
    """Serve with ``interceptors`` while a child process calls; count this process's CPU."""
    server = grpc.aio.server(interceptors=interceptors)
    server.add_generic_rpc_handlers((_echo_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        cpu_before = time.process_time()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.tracing_overhead",
            "--load-port",
            str(port),
            "--seconds",
            str(seconds),
            "--concurrency",
            str(concurrency),
            cwd=_ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        cpu_s = time.process_time() - cpu_before
    finally:
        await server.stop(None)
    load = json.loads(out)
    load["server_cpu_us_per_rpc"] = cpu_s / load["calls"] * 1e6
    return load


def _start_collector() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.otlp_collector"],
        cwd=_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if len(line) != 2 or line[0] != "port":
        proc.kill()
        raise RuntimeError(f"the collector did not start: {line}")
    return proc, f"http://127.0.0.1:{line[1]}"


def _collector_count(proc: subprocess.Popen[str]) -> int:
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write("count\n")
    proc.stdin.flush()
    return int(proc.stdout.readline().split()[1])


def _variants(tracing: Tracing) -> dict[str, Callable[[], list[Any]]]:
    off = Tracing.disabled()
    no_health = otel_filters.negate(otel_filters.health_check())
    return {
        "off": lambda: [],
        "metrics": lambda: server_interceptors(off, RpcStats(Side.SERVER)),
        "lean": lambda: server_interceptors(tracing, RpcStats(Side.SERVER)),
        "contrib": lambda: [
            aio_server_interceptor(tracer_provider=tracing.provider, filter_=no_health)
        ],
    }


async def _measure(
    tracing: Tracing, *, seconds: float, rounds: int, concurrency: int
) -> dict[str, list[dict[str, float]]]:
    variants = _variants(tracing)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, make in variants.items():
            results[name].append(await _round(make(), seconds=seconds, concurrency=concurrency))
            tracing.force_flush(10.0)
    return results


def _median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def run(*, seconds: float = 2.0, rounds: int = 3, concurrency: int = 16) -> dict[str, Any]:
    """Measure every variant; return RPC/s, p99, server CPU per RPC and the ratios.

    ``*_capacity_ratio`` = off's server CPU per RPC / the variant's: the share of the
    untraced throughput a CPU-bound server keeps (robust when the caller, not the
    server, is the bottleneck on a shared machine). ``*_throughput_ratio`` compares
    the observed RPC/s.
    """
    collector, endpoint = _start_collector()
    tracing = setup_tracing(
        TelemetrySettings(exporter=TelemetryExporter.OTLP, otlp_endpoint=endpoint),
        service_name="bench",
        version="0",
        environ={},
        install_global=False,
        max_queue=65536,
    )
    try:
        results = asyncio.run(
            _measure(tracing, seconds=seconds, rounds=rounds, concurrency=concurrency)
        )
        tracing.force_flush(30.0)
        received = _collector_count(collector)
    finally:
        tracing.shutdown()
        collector.kill()
        collector.wait()
    summary: dict[str, Any] = {}
    for name, rows in results.items():
        summary[f"{name}_rps"] = round(_median(rows, "rps"), 1)
        summary[f"{name}_p99_ms"] = round(_median(rows, "p99_ms"), 3)
        summary[f"{name}_server_cpu_us_per_rpc"] = round(_median(rows, "server_cpu_us_per_rpc"), 1)
    for name in results:
        if name != "off":
            summary[f"{name}_throughput_ratio"] = round(
                summary[f"{name}_rps"] / summary["off_rps"], 3
            )
            summary[f"{name}_capacity_ratio"] = round(
                summary["off_server_cpu_us_per_rpc"] / summary[f"{name}_server_cpu_us_per_rpc"], 3
            )
    counters = tracing.counters
    summary["spans_exported"] = counters.exported
    summary["spans_dropped"] = counters.dropped_queue_full + counters.export_failed
    summary["spans_received_by_collector"] = received
    summary["goal_lean_ratio_at_least"] = 0.85
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--load-port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_port:
        load = _load(args.load_port, seconds=args.seconds, concurrency=args.concurrency)
        print(json.dumps(asyncio.run(load)))
        return
    result = run(seconds=args.seconds, rounds=args.rounds, concurrency=args.concurrency)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
