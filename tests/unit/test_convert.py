"""Protobuf <-> model conversion: round trips and refusals."""

from __future__ import annotations

import pytest

from reconciler.api.agent.v1 import agent_pb2, event_pb2, metrics_pb2
from reconciler.convert import (
    Clocks,
    event_from_proto,
    event_to_proto,
    message_to_dict,
    operation_from_proto,
    record_to_info,
    spec_from_proto,
    spec_to_proto,
)
from reconciler.model import (
    AgentId,
    AgentRecord,
    AgentSpec,
    DesiredState,
    Event,
    EventType,
    ExitInfo,
    HeartbeatSpec,
    InvalidArgument,
    NodeId,
    Phase,
    RestartPolicy,
)
from reconciler.model.status import Backoff

FULL = AgentSpec(
    id=AgentId("shipper"),
    command=("/usr/bin/python3", "-m", "shipper"),
    env={"LOG_LEVEL": "info"},
    working_dir="/var/lib/shipper",
    version="1.4.2",
    state=DesiredState.STOPPED,
    restart_policy=RestartPolicy.ON_FAILURE,
    heartbeat=HeartbeatSpec(interval_s=5.0, timeout_s=15.0),
    stop_grace_period_s=7.5,
    config={"batch": 500.0, "targets": ["a", "b"], "tls": {"on": True}},
    labels={"team": "obs"},
    user="nobody",
)


def test_a_spec_survives_the_round_trip_through_protobuf() -> None:
    assert spec_from_proto(spec_to_proto(FULL)) == FULL


def test_a_spec_without_heartbeat_has_none_after_the_round_trip() -> None:
    bare = AgentSpec(id=AgentId("a"), command=("/bin/true",))
    assert spec_from_proto(spec_to_proto(bare)).heartbeat is None


@pytest.mark.parametrize(
    ("field", "name"),
    [
        pytest.param("state", "agents[2].state", id="state"),
        pytest.param("restart_policy", "agents[2].restartPolicy", id="restart-policy"),
    ],
)
def test_an_unspecified_enum_is_refused_naming_the_field(field: str, name: str) -> None:
    message = spec_to_proto(FULL)
    message.ClearField(field)
    with pytest.raises(InvalidArgument) as caught:
        spec_from_proto(message, path="agents[2]")
    assert caught.value.field == name


def test_a_non_finite_config_number_is_refused() -> None:
    message = spec_to_proto(FULL)
    message.config["bad"] = float("nan")
    with pytest.raises(InvalidArgument, match="finite"):
        spec_from_proto(message)


def test_a_record_becomes_agent_info_with_wall_clock_times() -> None:
    record = AgentRecord(
        agent_id=AgentId("shipper"),
        phase=Phase.BACKOFF,
        restart_count=3,
        last_exit=ExitInfo(code=None, signal=9, at_s=90.0),
        backoff=Backoff(next_attempt_s=104.0, delay_s=4.0, reason="killed by SIGKILL"),
        last_heartbeat_s=95.0,
    )
    clocks = Clocks(monotonic=100.0, wall=1_700_000_100.0)
    info = record_to_info(record, spec=FULL, override=None, clocks=clocks)
    assert info.phase == agent_pb2.AGENT_PHASE_BACKOFF
    assert info.last_exit.signal == 9
    assert info.last_exit.exited_at.seconds == 1_700_000_090
    assert info.backoff.next_attempt_at.seconds == 1_700_000_104
    assert info.last_heartbeat_age_seconds == pytest.approx(5.0)
    assert info.desired_version == "1.4.2"
    assert info.override == agent_pb2.OVERRIDE_NONE
    assert dict(info.labels) == {"team": "obs"}


def test_every_event_type_has_a_wire_value_and_comes_back() -> None:
    for kind in EventType:
        event = Event(type=kind, time=1.5, node_id=NodeId("n"), agent_id=AgentId("a"))
        assert event_from_proto(event_to_proto(event)) == event


def test_an_unknown_event_type_is_refused() -> None:
    with pytest.raises(InvalidArgument):
        event_from_proto(event_pb2.Event(type=event_pb2.EVENT_TYPE_UNSPECIFIED))


def test_an_unspecified_operation_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="operation"):
        operation_from_proto(agent_pb2.OPERATION_UNSPECIFIED)


def test_json_for_scripts_has_every_field_and_null_for_a_message_not_set() -> None:
    state = agent_pb2.AgentState(spec=spec_to_proto(FULL), node_id="edge-1")
    data = message_to_dict(state)
    assert data["info"] is None  # not observed yet
    assert data["spec"]["heartbeat"] == {"intervalSeconds": 5.0, "timeoutSeconds": 15.0}
    assert data["spec"]["config"] == {"batch": 500.0, "targets": ["a", "b"], "tls": {"on": True}}

    state.info.phase = agent_pb2.AGENT_PHASE_RUNNING
    state.info.started_at.FromSeconds(1_700_000_000)
    info = message_to_dict(state)["info"]
    assert info["startedAt"] == "2023-11-14T22:13:20Z"
    assert info["lastHeartbeatAt"] is None
    assert info["pid"] == 0  # a scalar keeps its default

    point = metrics_pb2.ResourceDataPoint(cpu_percent=1.5)
    series = message_to_dict(metrics_pb2.MetricData(agent_id="a", data_points=[point]))
    assert series["dataPoints"] == [{"timestamp": None, "cpuPercent": 1.5, "memoryBytes": "0"}]
