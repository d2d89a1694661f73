"""Tracing overhead: ``bench.tracing_overhead.run()`` when that benchmark is present.

What: imports ``bench.tracing_overhead`` and turns the dict its ``run()`` returns
into a report section: RPC throughput and p99 latency with tracing on and off,
measured in one run, against the target of at most 15% throughput lost.

What not: the measuring itself (``bench.tracing_overhead``).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from typing import Any

from bench.report import Figure, Section, at_least_ratio

__all__ = ["run"]

_MODULE = "bench.tracing_overhead"
QUICK: Mapping[str, Any] = {"seconds": 0.3, "rounds": 1}
VARIANTS: Mapping[str, str] = {
    "metrics": "RPC metrics only, tracing off",
    "contrib": "the opentelemetry-instrumentation-grpc interceptors",
}


def _number(result: Mapping[str, Any], name: str) -> float | None:
    value = result.get(name)
    return float(value) if isinstance(value, int | float) else None


def _figures(result: Mapping[str, Any]) -> list[Figure]:
    off_rps, off_p99 = _number(result, "off_rps"), _number(result, "off_p99_ms")
    figures = [
        Figure(
            "RPC/s, tracing on with batch OTLP export (vs off)",
            "RPC/s",
            _number(result, "lean_rps"),
            off_rps,
            at_least_ratio(0.85, "≥ 85% of the untraced rate"),
        ),
        Figure("p99, tracing on (vs off)", "ms", _number(result, "lean_p99_ms"), off_p99),
    ]
    for variant, label in VARIANTS.items():
        figures.append(Figure(f"RPC/s, {label} (vs off)", "RPC/s",
                              _number(result, f"{variant}_rps"), off_rps))  # fmt: skip
    return figures


def run(*, quick: bool = False) -> Section:
    section = Section(
        key="tracing",
        title="Tracing overhead",
        issue="issue 6 (observability)",
        comparison="tracing off (same run)",
        method="`bench/tracing_overhead.py`: one grpc.aio server, called by an untraced "
        "client in another process with a sampled `traceparent` on every call, an echo "
        "RPC, the variants in interleaved rounds (median round counts): "
        "no interceptors (off), RPC metrics only, reconciler's tracing with batch OTLP "
        "export to a collector in another process, and the contrib instrumentation.",
    )
    if importlib.util.find_spec(_MODULE) is None:
        return Section(**{**_fields(section), "error": f"{_MODULE} is not present"})
    result: Mapping[str, Any] = importlib.import_module(_MODULE).run(**(QUICK if quick else {}))
    details = {str(key): str(value) for key, value in result.items()}
    return Section(**{**_fields(section), "figures": _figures(result), "details": details})


def _fields(section: Section) -> dict[str, Any]:
    return {name: getattr(section, name) for name in Section.__dataclass_fields__}
