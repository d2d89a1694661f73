"""One logging setup for every reconciler process (CLI, daemon, Manager, dev mode).

``setup_logging`` installs a single handler on the root logger that writes to the
*current* ``sys.stderr`` either as one JSON object per line (for log collectors) or as
a readable line (for people). Fields passed with ``extra=`` (``node_id``, ``agent_id``,
...) become JSON keys or ``key=value`` pairs, and the ids of the current OpenTelemetry
span are added so a log line can be found from its trace.

What it does not do: configure exporters or tracing (``reconciler.telemetry``), or
decide levels per subsystem. Settings arrive as ``LoggingSettings`` from
``reconciler.config``; the CLI's ``--log-format``/``--log-level`` override them.
"""

from __future__ import annotations

import enum
import json
import logging
import sys
import time
from typing import Any, Final

from opentelemetry import trace

__all__ = [
    "JsonFormatter",
    "LogFormat",
    "LogLevel",
    "TextFormatter",
    "setup_logging",
]


class LogFormat(enum.StrEnum):
    """How log records are written."""

    TEXT = "text"
    JSON = "json"


class LogLevel(enum.StrEnum):
    """The least severe level that is written."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


_LEVEL_NUMBERS: Final = {
    LogLevel.DEBUG: logging.DEBUG,
    LogLevel.INFO: logging.INFO,
    LogLevel.WARNING: logging.WARNING,
    LogLevel.ERROR: logging.ERROR,
}

#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS: Final = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)).keys()
) | {"message", "asctime", "taskName"}

#: Keys the JSON formatter owns; an ``extra`` field of the same name cannot replace them.
_CORE_KEYS: Final = frozenset({"ts", "level", "logger", "msg", "exc", "trace_id", "span_id"})


def _timestamp(created: float) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-01-02T03:04:05.678Z``."""
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a caller passed with ``extra=``, in the order they were given."""
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _STANDARD_ATTRS and not key.startswith("_")
    }


def _trace_ids() -> dict[str, str]:
    """``trace_id`` and ``span_id`` of the current span, or nothing outside a span."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, extras, trace ids, exc."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            document.setdefault(key if key not in _CORE_KEYS else f"extra_{key}", value)
        document.update(_trace_ids())
        if record.exc_info:
            document["exc"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``ts LEVEL logger: msg key=value ...`` for people reading a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {**_extras(record), **_trace_ids()}
        pairs = "".join(f" {key}={value}" for key, value in fields.items())
        line = (
            f"{_timestamp(record.created)} {record.levelname:<7} {record.name}: "
            f"{record.getMessage()}{pairs}"
        )
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at emit time (test runners swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # logging must never take the process down
            self.handleError(record)


def _formatter(log_format: LogFormat) -> logging.Formatter:
    return JsonFormatter() if log_format is LogFormat.JSON else TextFormatter()


def setup_logging(
    format: LogFormat | str = LogFormat.TEXT,
    level: LogLevel | str = LogLevel.INFO,
) -> None:
    """Route every logger through one stderr handler in ``format`` at ``level``.

    Calling it again replaces the handler it installed before (never adds a second),
    so the CLI can set a default early and the daemon can apply its settings later.
    Handlers installed by others (a test runner's, say) are left alone.
    Raises ``ValueError`` for an unknown format or level.
    """
    log_format = LogFormat(str(format).lower())
    log_level = LogLevel(str(level).lower())
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(_formatter(log_format))
    root.addHandler(handler)
    root.setLevel(_LEVEL_NUMBERS[log_level])
