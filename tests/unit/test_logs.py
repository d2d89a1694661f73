"""One logging setup: JSON or text lines on stderr, extras and trace ids included,
and calling it twice never duplicates output."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from reconciler.logs import LogFormat, LogLevel, setup_logging

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
SPAN_ID = 0x00F067AA0BA902B7


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def records(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines()]


def test_a_json_record_has_the_core_fields_and_the_extras(
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup_logging("json", "info")
    logging.getLogger("reconciler.daemon").info(
        "agent %s started", "shipper", extra={"node_id": "n1", "agent_id": "shipper"}
    )
    [record] = records(capsys.readouterr().err)
    assert record["level"] == "info"
    assert record["logger"] == "reconciler.daemon"
    assert record["msg"] == "agent shipper started"
    assert record["node_id"] == "n1"
    assert record["agent_id"] == "shipper"
    assert str(record["ts"]).endswith("Z")
    assert "trace_id" not in record


def test_a_json_record_inside_a_span_carries_its_trace_and_span_ids(
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup_logging(LogFormat.JSON, LogLevel.INFO)
    context = SpanContext(TRACE_ID, SPAN_ID, is_remote=False, trace_flags=TraceFlags(1))
    with trace.use_span(NonRecordingSpan(context)):
        logging.getLogger("t").warning("inside")
    [record] = records(capsys.readouterr().err)
    assert record["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert record["span_id"] == "00f067aa0ba902b7"


def test_an_extra_field_cannot_replace_a_core_field(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("json", "info")
    logging.getLogger("real").info("hello", extra={"logger": "fake"})
    [record] = records(capsys.readouterr().err)
    assert record["logger"] == "real"
    assert record["extra_logger"] == "fake"


def test_an_exception_is_kept_in_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("json", "info")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("t").exception("failed")
    [record] = records(capsys.readouterr().err)
    assert "RuntimeError: boom" in str(record["exc"])


def test_the_text_format_is_one_readable_line(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("text", "debug")
    logging.getLogger("reconciler.cli").debug("applied %d sets", 2, extra={"node_id": "n1"})
    line = capsys.readouterr().err
    assert line.count("\n") == 1
    assert "DEBUG" in line
    assert "reconciler.cli: applied 2 sets node_id=n1" in line


def test_records_below_the_level_are_dropped(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("text", "warning")
    logging.getLogger("t").info("quiet")
    logging.getLogger("t").error("loud")
    err = capsys.readouterr().err
    assert "quiet" not in err
    assert "loud" in err


def test_calling_setup_twice_keeps_one_handler_and_the_latest_format(
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup_logging("text", "info")
    setup_logging("json", "info")
    handlers = len(logging.getLogger().handlers)
    setup_logging("json", "info")
    assert len(logging.getLogger().handlers) == handlers
    logging.getLogger("t").info("once")
    assert [r["msg"] for r in records(capsys.readouterr().err)] == ["once"]


@pytest.mark.parametrize(
    ("log_format", "level"),
    [pytest.param("xml", "info", id="format"), pytest.param("text", "loud", id="level")],
)
def test_an_unknown_format_or_level_is_refused(log_format: str, level: str) -> None:
    with pytest.raises(ValueError, match=r"is not a valid"):
        setup_logging(log_format, level)
