"""The heartbeat decoder: every rule of api/heartbeat.md, with the reason and the field."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.daemon.heartbeat.codec import HeartbeatError, decode_heartbeat
from reconciler.daemon.heartbeat.contract import RejectReason, Transport
from reconciler.daemon.heartbeat.stats import HeartbeatStats
from reconciler.model.heartbeat import Heartbeat, ReportedStatus

GOOD: dict[str, Any] = {
    "agent_id": "shipper-1",
    "pid": 4242,
    "timestamp": 1_700_000_000.25,
    "version": "1.4.2",
    "status": "healthy",
    "cpu": 3.5,
    "memory": 12_345_678,
}


def encode(**changes: Any) -> bytes:
    body = {**GOOD, **changes}
    return json.dumps({k: v for k, v in body.items() if v is not DROP}).encode()


DROP = object()


def rejection(data: bytes) -> tuple[RejectReason, str | None]:
    with pytest.raises(HeartbeatError) as info:
        decode_heartbeat(data)
    return info.value.reason, info.value.field


def outcome(data: bytes) -> RejectReason | None:
    """None when ``data`` decodes; the reason otherwise (any other exception escapes)."""
    try:
        decode_heartbeat(data)
    except HeartbeatError as exc:
        return exc.reason
    return None


def test_a_good_heartbeat_becomes_the_model_record() -> None:
    heartbeat, token = decode_heartbeat(encode(seq=7))
    assert heartbeat == Heartbeat(
        agent_id="shipper-1",  # type: ignore[arg-type]
        pid=4242,
        timestamp=1_700_000_000.25,
        version="1.4.2",
        status=ReportedStatus.HEALTHY,
        cpu_percent=3.5,
        memory_bytes=12_345_678,
        seq=7,
    )
    assert token is None


def test_the_token_is_returned_beside_the_heartbeat_not_inside_it() -> None:
    heartbeat, token = decode_heartbeat(encode(token="s3cr:et"))
    assert token == "s3cr:et"
    assert heartbeat.seq is None


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(encode(version="build:42"), id="colon-in-a-string-takes-the-slow-path"),
        pytest.param(encode(timestamp=1e25), id="huge-float-written-with-an-exponent"),
        pytest.param(encode(version=""), id="empty-version"),
        pytest.param(encode(cpu=102400.0, memory=2**53, pid=2**22), id="upper-bounds"),
        pytest.param(encode(seq=2**63 - 1), id="largest-seq"),
        pytest.param(encode(timestamp=0), id="integer-timestamp"),
        pytest.param(
            b' { "agent_id" : "a" , "pid" : 1 , "timestamp" : 1 , "version" : "v" ,'
            b' "status" : "starting" , "cpu" : 0 , "memory" : 0 }\n',
            id="spaced-out",
        ),
        pytest.param(encode(agent_id="a" * 63), id="longest-agent-id"),
    ],
)
def test_valid_edge_cases_are_accepted(data: bytes) -> None:
    decode_heartbeat(data)


@pytest.mark.parametrize(
    ("data", "reason", "field"),
    [
        pytest.param(b"", RejectReason.BAD_JSON, None, id="empty"),
        pytest.param(b"\xff\xfe\x00garbage", RejectReason.BAD_JSON, None, id="random-bytes"),
        pytest.param(encode()[:-5], RejectReason.BAD_JSON, None, id="truncated"),
        pytest.param(b"[1, 2]", RejectReason.BAD_JSON, None, id="not-an-object"),
        pytest.param(b'"hello"', RejectReason.BAD_JSON, None, id="a-string"),
        pytest.param(encode() + b"{}", RejectReason.BAD_JSON, None, id="two-objects"),
        pytest.param(encode().replace(b"3.5", b"NaN"), RejectReason.BAD_JSON, None, id="nan"),
        pytest.param(encode().replace(b"3.5", b"Infinity"), RejectReason.BAD_JSON, None, id="inf"),
        pytest.param(
            encode().replace(b"3.5", b"1e400"), RejectReason.BAD_FIELD, "cpu", id="overflow"
        ),
        pytest.param(
            encode(version="\xff").replace(b"\\u00ff", b"\xff\xfe"),
            RejectReason.BAD_JSON,
            None,
            id="invalid-utf8",
        ),
        pytest.param(encode(version="\ud800"), RejectReason.BAD_JSON, None, id="lone-surrogate"),
        pytest.param(b"[" * 60_000, RejectReason.BAD_JSON, None, id="deep-array"),
        pytest.param(
            b'{"agent_id":' + b'{"a":' * 12_000,
            RejectReason.BAD_FIELD,
            "agent_id",
            id="deep-object-in-a-field",
        ),
        pytest.param(
            encode()[:-1] + b',"x":' + b"[" * 60_000,
            RejectReason.BAD_FIELD,
            "x",
            id="deep-unknown-field",
        ),
        pytest.param(encode(pid=[1]), RejectReason.BAD_FIELD, "pid", id="array-value"),
        pytest.param(
            encode(version={"a": 1}), RejectReason.BAD_FIELD, "version", id="object-value"
        ),
        pytest.param(encode(extra=1), RejectReason.BAD_FIELD, "extra", id="unknown-field"),
        pytest.param(encode(pid=DROP), RejectReason.BAD_FIELD, "pid", id="missing-field"),
        pytest.param(encode(pid="1"), RejectReason.BAD_FIELD, "pid", id="string-pid"),
        pytest.param(encode(pid=1.0), RejectReason.BAD_FIELD, "pid", id="float-pid"),
        pytest.param(encode(pid=True), RejectReason.BAD_FIELD, "pid", id="bool-pid"),
        pytest.param(encode(pid=0), RejectReason.BAD_FIELD, "pid", id="pid-zero"),
        pytest.param(encode(pid=2**22 + 1), RejectReason.BAD_FIELD, "pid", id="pid-too-big"),
        pytest.param(encode(timestamp=-1), RejectReason.BAD_FIELD, "timestamp", id="negative-time"),
        pytest.param(
            encode(timestamp=10**21),
            RejectReason.BAD_JSON,
            "timestamp",
            id="timestamp-with-22-digits",
        ),
        pytest.param(
            encode().replace(b"1700000000.25", b"9" * 5000),
            RejectReason.BAD_JSON,
            "timestamp",
            id="5000-digit-timestamp",
        ),
        pytest.param(
            encode().replace(b"12345678", b"9" * 5000),
            RejectReason.BAD_JSON,
            "memory",
            id="5000-digit-memory",
        ),
        pytest.param(encode(cpu=-0.1), RejectReason.BAD_FIELD, "cpu", id="negative-cpu"),
        pytest.param(encode(cpu=102400.5), RejectReason.BAD_FIELD, "cpu", id="cpu-too-big"),
        pytest.param(
            encode(memory=2**53 + 1), RejectReason.BAD_FIELD, "memory", id="memory-too-big"
        ),
        pytest.param(encode(seq=-1), RejectReason.BAD_FIELD, "seq", id="negative-seq"),
        pytest.param(encode(seq=2**63), RejectReason.BAD_FIELD, "seq", id="seq-too-big"),
        pytest.param(encode(seq=None), RejectReason.BAD_FIELD, "seq", id="null-seq"),
        pytest.param(encode(status="dead"), RejectReason.BAD_FIELD, "status", id="unknown-status"),
        pytest.param(encode(agent_id=""), RejectReason.BAD_FIELD, "agent_id", id="empty-agent-id"),
        pytest.param(encode(agent_id="-x"), RejectReason.BAD_FIELD, "agent_id", id="leading-dash"),
        pytest.param(encode(agent_id="a/b"), RejectReason.BAD_FIELD, "agent_id", id="slash-in-id"),
        pytest.param(
            encode(agent_id="a\n"), RejectReason.BAD_FIELD, "agent_id", id="newline-in-id"
        ),
        pytest.param(
            encode(agent_id="a" * 64), RejectReason.BAD_FIELD, "agent_id", id="id-too-long"
        ),
        pytest.param(
            encode(version="v" * 129), RejectReason.BAD_FIELD, "version", id="version-too-long"
        ),
        pytest.param(
            encode(version="1\x07"), RejectReason.BAD_FIELD, "version", id="unprintable-version"
        ),
        pytest.param(encode(token=5), RejectReason.BAD_FIELD, "token", id="numeric-token"),
        pytest.param(
            encode()[:-1] + b',"pid":1}', RejectReason.BAD_JSON, "pid", id="duplicate-key"
        ),
        pytest.param(
            encode()[:-1] + b',"p\\u0069d":1}',
            RejectReason.BAD_JSON,
            "pid",
            id="duplicate-key-spelled-with-an-escape",
        ),
        pytest.param(
            encode(version="a:b")[:-1] + b',"cpu":1}',
            RejectReason.BAD_JSON,
            "cpu",
            id="duplicate-key-beside-a-colon-in-a-string",
        ),
        pytest.param(b" " * 65_537, RejectReason.TOO_LARGE, None, id="too-large"),
    ],
)
def test_bad_heartbeats_are_refused_with_the_reason_and_field(
    data: bytes, reason: RejectReason, field: str | None
) -> None:
    assert rejection(data) == (reason, field)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"[" * 100_000, id="array"),
        pytest.param(b'{"pid":' + b'{"a":' * 100_000, id="object"),
        pytest.param(
            encode()[:-1] + b',"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}", id="closed"
        ),
    ],
)
def test_100000_deep_nesting_is_refused_without_recursion_even_past_the_size_limit(
    data: bytes,
) -> None:
    with pytest.raises(HeartbeatError) as info:
        decode_heartbeat(data, max_bytes=len(data))
    assert info.value.reason in {RejectReason.BAD_JSON, RejectReason.BAD_FIELD}


def test_an_unknown_field_name_is_clipped_in_the_error() -> None:
    reason, field = rejection(encode(**{"k" * 5000: 1}))
    assert reason is RejectReason.BAD_FIELD
    assert field == "k" * 64


def test_the_size_limit_can_be_lowered() -> None:
    with pytest.raises(HeartbeatError) as info:
        decode_heartbeat(encode(), max_bytes=10)
    assert info.value.reason is RejectReason.TOO_LARGE


@given(st.binary(max_size=512))
def test_arbitrary_bytes_either_decode_or_raise_a_heartbeat_error(data: bytes) -> None:
    assert outcome(data) in {None, RejectReason.BAD_JSON, RejectReason.BAD_FIELD}


@given(
    st.dictionaries(
        st.sampled_from([*GOOD, "seq", "token", "other"]),
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        max_size=10,
    )
)
def test_arbitrary_flat_objects_never_escape_as_another_exception(body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    assert outcome(data) in {None, RejectReason.BAD_JSON, RejectReason.BAD_FIELD}


def test_stats_count_per_transport_and_export_labelled_rows() -> None:
    stats = HeartbeatStats()
    unix = stats.counters(Transport.UNIX)
    unix.received += 3
    unix.accepted += 2
    unix.reject(RejectReason.FORBIDDEN)
    snapshot = stats.snapshot().get(Transport.UNIX)
    assert (snapshot.received, snapshot.accepted, snapshot.rejected_total) == (3, 2, 1)
    assert stats.snapshot().get(Transport.HTTP).received == 0
    rows = {(s.name, s.labels): s.value for s in stats.collect()}
    key = ("reconciler_heartbeats_rejected_total", (("transport", "unix"), ("reason", "forbidden")))
    assert rows[key] == 1


def test_an_out_of_range_number_followed_by_deep_nesting_is_still_a_plain_refusal() -> None:
    data = encode()[:-1] + b', "memory": ' + b"9" * 25 + b', "x": ' + b"[" * 60_000 + b"}"
    assert outcome(data) in {RejectReason.BAD_JSON, RejectReason.BAD_FIELD}
