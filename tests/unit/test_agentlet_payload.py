"""The heartbeat agentlet puts on the wire: fields, limits, encoding, schema, metrics text."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentlet.heartbeat import (
    MAX_FRAME_BYTES,
    Heartbeat,
    HeartbeatStatus,
    clamp_cpu,
    clamp_memory,
    encode_heartbeat,
    encode_line,
)
from agentlet.metrics import MetricsSnapshot, format_metrics

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "api" / "heartbeat.schema.json"
WIRE_FIELDS = {"agent_id", "pid", "timestamp", "version", "status", "cpu", "memory", "seq"}


def make(**changes: Any) -> Heartbeat:
    fields: dict[str, Any] = {
        "agent_id": "web-1",
        "pid": 4242,
        "timestamp": 1767225600.125,
        "version": "1.4.2",
        "status": HeartbeatStatus.HEALTHY,
        "cpu": 3.5,
        "memory": 52_428_800,
        "seq": 17,
    }
    fields.update(changes)
    return Heartbeat(**fields)


def test_the_encoded_heartbeat_carries_exactly_the_wire_fields() -> None:
    body = json.loads(encode_heartbeat(make(), include_token=False))
    assert body == {
        "agent_id": "web-1",
        "pid": 4242,
        "timestamp": 1767225600.125,
        "version": "1.4.2",
        "status": "healthy",
        "cpu": 3.5,
        "memory": 52_428_800,
        "seq": 17,
    }


def test_the_token_is_sent_only_when_asked_for() -> None:
    heartbeat = make(token="s3cret")
    assert "token" not in json.loads(encode_heartbeat(heartbeat, include_token=False))
    assert json.loads(encode_heartbeat(heartbeat, include_token=True))["token"] == "s3cret"


def test_a_socket_line_is_one_compact_object_ending_in_a_newline() -> None:
    line = encode_line(make(), include_token=False)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert b" " not in line


def test_a_heartbeat_without_seq_leaves_the_field_out() -> None:
    assert "seq" not in json.loads(encode_heartbeat(make(seq=None), include_token=False))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        pytest.param("agent_id", "", id="empty-agent-id"),
        pytest.param("agent_id", "a b", id="agent-id-with-space"),
        pytest.param("pid", 0, id="pid-zero"),
        pytest.param("pid", 2**22 + 1, id="pid-above-pid-max"),
        pytest.param("timestamp", math.nan, id="timestamp-nan"),
        pytest.param("timestamp", -1.0, id="timestamp-negative"),
        pytest.param("version", "v" * 129, id="version-too-long"),
        pytest.param("version", "1\n2", id="version-unprintable"),
        pytest.param("status", "fine", id="status-unknown"),
        pytest.param("cpu", math.inf, id="cpu-infinite"),
        pytest.param("cpu", -0.5, id="cpu-negative"),
        pytest.param("memory", 2**53 + 1, id="memory-too-large"),
        pytest.param("seq", -1, id="seq-negative"),
        pytest.param("seq", 2**63, id="seq-too-large"),
    ],
)
def test_a_heartbeat_outside_the_wire_limits_cannot_be_built(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        make(**{field: value})


def test_an_oversized_line_is_refused_before_sending() -> None:
    heartbeat = make(token="t" * MAX_FRAME_BYTES)
    with pytest.raises(ValueError, match="exceeds"):
        encode_line(heartbeat, include_token=True)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(math.nan, 0.0, id="nan-is-zero"),
        pytest.param(-3.0, 0.0, id="negative-is-zero"),
        pytest.param(1e9, 102400.0, id="huge-is-capped"),
        pytest.param(250.0, 250.0, id="a-busy-tree-is-kept"),
    ],
)
def test_sampled_cpu_is_clamped_into_the_wire_range(value: float, expected: float) -> None:
    assert clamp_cpu(value) == expected


def test_sampled_memory_is_clamped_into_the_wire_range() -> None:
    assert clamp_memory(-1) == 0
    assert clamp_memory(2**60) == 2**53


def schema_validator() -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_encoded_heartbeats_satisfy_the_published_schema() -> None:
    validator = schema_validator()
    for status in HeartbeatStatus:
        body = json.loads(encode_heartbeat(make(status=status, token="tok"), include_token=True))
        assert list(validator.iter_errors(body)) == []


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"extra": 1}, id="unknown-field"),
        pytest.param({"status": "fine"}, id="unknown-status"),
        pytest.param({"cpu": {"user": 1}}, id="nested-object"),
        pytest.param({"pid": 0}, id="pid-zero"),
        pytest.param({"agent_id": "-x"}, id="bad-agent-id"),
    ],
)
def test_the_schema_rejects_what_the_contract_rejects(change: dict[str, object]) -> None:
    validator = schema_validator()
    body = {**json.loads(encode_heartbeat(make(), include_token=False)), **change}
    assert list(validator.iter_errors(body)) != []


def test_the_schema_lists_the_wire_fields_and_their_requirements() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    assert set(schema["properties"]) == WIRE_FIELDS | {"token"}
    assert set(schema["required"]) == WIRE_FIELDS - {"seq"}
    assert schema["additionalProperties"] is False


def test_metrics_text_parses_as_prometheus_exposition() -> None:
    snapshot = MetricsSnapshot(
        agent_id='we"b\\1',
        cpu_percent=12.5,
        memory_bytes=1024,
        heartbeats_sent=7,
        heartbeats_failed=2,
        last_delivery_age_s=0.25,
    )
    families = {f.name: f for f in text_string_to_metric_families(format_metrics(snapshot))}
    values = {f.name: f.samples[0].value for f in families.values()}
    assert values == {
        "agentlet_cpu_percent": 12.5,
        "agentlet_memory_bytes": 1024,
        "agentlet_heartbeats_sent": 7,
        "agentlet_heartbeats_failed": 2,
        "agentlet_last_heartbeat_age_seconds": 0.25,
    }
    assert families["agentlet_heartbeats_sent"].type == "counter"
    assert families["agentlet_cpu_percent"].samples[0].labels == {"agent_id": 'we"b\\1'}


def test_metrics_before_the_first_heartbeat_report_an_unknown_age() -> None:
    snapshot = MetricsSnapshot("a", 0.0, 0, 0, 0, None)
    families = {f.name: f for f in text_string_to_metric_families(format_metrics(snapshot))}
    assert math.isnan(families["agentlet_last_heartbeat_age_seconds"].samples[0].value)
