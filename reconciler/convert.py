"""The one place that converts between protobuf messages and the domain model.

Servicers call these functions and nothing else to cross the boundary, so a field
added to the API or the model is mapped once. Conversions from protobuf validate:
they raise ``InvalidArgument`` naming the field (in the API's field names) and never
return a half-built value. Monotonic times in records become wall-clock timestamps
here, given both clocks' "now".

Documents the Manager stores (desired agent lists, AgentSets, observed records) are
JSON text in protobuf's canonical JSON mapping; the ``*_json`` functions at the end
are the one way to write and read them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf import json_format, message, struct_pb2, timestamp_pb2

from reconciler.api.agent.v1 import agent_pb2, event_pb2, metrics_pb2
from reconciler.model.errors import InvalidArgument
from reconciler.model.events import Event, EventType
from reconciler.model.heartbeat import ReportedStatus
from reconciler.model.ids import AgentId, Generation
from reconciler.model.spec import (
    AgentSpec,
    DesiredState,
    HeartbeatSpec,
    NodeDesiredState,
    RestartPolicy,
)
from reconciler.model.status import AgentRecord, Override, Phase

__all__ = [
    "Clocks",
    "M",
    "event_from_proto",
    "event_to_proto",
    "message_from_json",
    "message_to_dict",
    "message_to_json",
    "node_state_from_proto",
    "operation_from_proto",
    "operation_to_proto",
    "phase_to_proto",
    "record_to_info",
    "spec_from_proto",
    "spec_messages_from_json",
    "spec_to_proto",
    "specs_from_json",
    "specs_to_json",
    "timestamp",
    "wall_seconds",
]

_DESIRED = {
    agent_pb2.DESIRED_STATE_RUNNING: DesiredState.RUNNING,
    agent_pb2.DESIRED_STATE_STOPPED: DesiredState.STOPPED,
}
_RESTART = {
    agent_pb2.RESTART_POLICY_ALWAYS: RestartPolicy.ALWAYS,
    agent_pb2.RESTART_POLICY_ON_FAILURE: RestartPolicy.ON_FAILURE,
    agent_pb2.RESTART_POLICY_NEVER: RestartPolicy.NEVER,
}
_PHASE = {
    Phase.PENDING: agent_pb2.AGENT_PHASE_PENDING,
    Phase.STARTING: agent_pb2.AGENT_PHASE_STARTING,
    Phase.RUNNING: agent_pb2.AGENT_PHASE_RUNNING,
    Phase.DEGRADED: agent_pb2.AGENT_PHASE_DEGRADED,
    Phase.BACKOFF: agent_pb2.AGENT_PHASE_BACKOFF,
    Phase.STOPPING: agent_pb2.AGENT_PHASE_STOPPING,
    Phase.STOPPED: agent_pb2.AGENT_PHASE_STOPPED,
    Phase.FAILED: agent_pb2.AGENT_PHASE_FAILED,
}
_REPORTED = {
    ReportedStatus.STARTING: agent_pb2.REPORTED_STATUS_STARTING,
    ReportedStatus.HEALTHY: agent_pb2.REPORTED_STATUS_HEALTHY,
    ReportedStatus.DEGRADED: agent_pb2.REPORTED_STATUS_DEGRADED,
    ReportedStatus.UNHEALTHY: agent_pb2.REPORTED_STATUS_UNHEALTHY,
}
_OVERRIDE = {
    None: agent_pb2.OVERRIDE_NONE,
    Override.START: agent_pb2.OVERRIDE_START,
    Override.STOP: agent_pb2.OVERRIDE_STOP,
}
_OPERATION = {
    agent_pb2.OPERATION_START: "start",
    agent_pb2.OPERATION_STOP: "stop",
    agent_pb2.OPERATION_RESTART: "restart",
}
M = TypeVar("M", bound=message.Message)

_EVENT_TYPES = {t: event_pb2.EventType.Value(f"EVENT_TYPE_{t.name}") for t in EventType}


@dataclass(frozen=True, slots=True)
class Clocks:
    """Both clocks read at one moment, to turn monotonic record times into wall times."""

    monotonic: float
    wall: float

    def to_wall(self, monotonic_s: float) -> float:
        return self.wall - (self.monotonic - monotonic_s)


def timestamp(wall_s: float) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp for Unix seconds."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(wall_s * 1e9))
    return stamp


# -- specs -----------------------------------------------------------------------


def spec_to_proto(spec: AgentSpec) -> agent_pb2.AgentSpec:
    """An AgentSpec message for a model spec."""
    message = agent_pb2.AgentSpec(
        id=spec.id,
        command=list(spec.command),
        env=dict(spec.env),
        working_dir=spec.working_dir,
        version=spec.version,
        state=_key_for(_DESIRED, spec.state),
        restart_policy=_key_for(_RESTART, spec.restart_policy),
        stop_grace_period_seconds=spec.stop_grace_period_s,
        labels=dict(spec.labels),
        user=spec.user,
    )
    if spec.heartbeat is not None:
        message.heartbeat.interval_seconds = spec.heartbeat.interval_s
        message.heartbeat.timeout_seconds = spec.heartbeat.timeout_s
    if spec.config:
        message.config.update(dict(spec.config))
    return message


def spec_from_proto(message: agent_pb2.AgentSpec, *, path: str = "agent") -> AgentSpec:
    """A model spec for an AgentSpec message; enums must be set."""
    if message.state not in _DESIRED:
        raise InvalidArgument(f"{path}.state", "must be running or stopped")
    if message.restart_policy not in _RESTART:
        raise InvalidArgument(f"{path}.restartPolicy", "must be Always, OnFailure or Never")
    heartbeat = None
    if message.HasField("heartbeat"):
        heartbeat = HeartbeatSpec(
            interval_s=message.heartbeat.interval_seconds,
            timeout_s=message.heartbeat.timeout_seconds,
        )
    return AgentSpec(
        id=AgentId(message.id),
        command=tuple(message.command),
        env=dict(message.env),
        working_dir=message.working_dir,
        version=message.version,
        state=_DESIRED[message.state],
        restart_policy=_RESTART[message.restart_policy],
        heartbeat=heartbeat,
        stop_grace_period_s=message.stop_grace_period_seconds,
        config=_struct_to_dict(message.config, path=f"{path}.config"),
        labels=dict(message.labels),
        user=message.user,
    )


def node_state_from_proto(
    generation: int, agents: Any, *, path: str = "agents"
) -> NodeDesiredState:
    """A node's desired state from a generation and repeated AgentSpec messages."""
    specs = tuple(spec_from_proto(a, path=f"{path}[{i}]") for i, a in enumerate(agents))
    return NodeDesiredState(Generation(generation), specs)


def _struct_to_dict(struct: struct_pb2.Struct, *, path: str) -> dict[str, Any]:
    return {
        key: _value(value, path=f"{path}.{key}", depth=1) for key, value in struct.fields.items()
    }


def _value(value: struct_pb2.Value, *, path: str, depth: int) -> Any:
    if depth > 32:
        raise InvalidArgument(path, "nested deeper than 32 levels")
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        if not math.isfinite(value.number_value):
            raise InvalidArgument(path, "numbers must be finite")
        return value.number_value
    if kind == "struct_value":
        fields = value.struct_value.fields
        return {k: _value(v, path=f"{path}.{k}", depth=depth + 1) for k, v in fields.items()}
    if kind == "list_value":
        items = value.list_value.values
        return [_value(v, path=f"{path}[{i}]", depth=depth + 1) for i, v in enumerate(items)]
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None


# -- observed records ------------------------------------------------------------


def phase_to_proto(phase: Phase) -> int:
    """The AgentPhase enum value for a model phase."""
    return _PHASE[phase]


def record_to_info(
    record: AgentRecord,
    *,
    spec: AgentSpec | None,
    override: Override | None,
    clocks: Clocks,
) -> agent_pb2.AgentInfo:
    """An AgentInfo message derived from a record at the moment ``clocks`` was read."""
    info = agent_pb2.AgentInfo(
        agent_id=record.agent_id,
        phase=_PHASE[record.phase],
        pid=record.pid or 0,
        restart_count=record.restart_count,
        reported_version=record.reported_version,
        desired_version=spec.version if spec else "",
        cpu_percent=record.cpu_percent,
        memory_bytes=record.memory_bytes,
        message=record.message,
        override=_OVERRIDE[override],
        labels=dict(spec.labels) if spec else {},
    )
    if record.started_at_s is not None:
        info.started_at.CopyFrom(timestamp(clocks.to_wall(record.started_at_s)))
    if record.last_exit is not None:
        exit_info = record.last_exit
        if exit_info.signal is not None:
            info.last_exit.signal = exit_info.signal
        elif exit_info.code is not None:
            info.last_exit.exit_code = exit_info.code
        info.last_exit.exited_at.CopyFrom(timestamp(clocks.to_wall(exit_info.at_s)))
    if record.last_heartbeat_s is not None:
        info.last_heartbeat_at.CopyFrom(timestamp(clocks.to_wall(record.last_heartbeat_s)))
        info.last_heartbeat_age_seconds = max(0.0, clocks.monotonic - record.last_heartbeat_s)
    if record.reported_status is not None:
        info.reported_status = _REPORTED[record.reported_status]
    if record.backoff is not None and record.phase is Phase.BACKOFF:
        info.backoff.next_attempt_at.CopyFrom(
            timestamp(clocks.to_wall(record.backoff.next_attempt_s))
        )
        info.backoff.reason = record.backoff.reason
    return info


# -- operations and events ---------------------------------------------------------


def operation_from_proto(value: agent_pb2.Operation.ValueType) -> str:
    """'start', 'stop' or 'restart' for an Operation enum value."""
    try:
        return _OPERATION[value]
    except KeyError:
        raise InvalidArgument("operation", "must be START, STOP or RESTART") from None


def operation_to_proto(operation: str) -> agent_pb2.Operation.ValueType:
    """The Operation enum value for 'start', 'stop' or 'restart'."""
    value: agent_pb2.Operation.ValueType = _key_for(_OPERATION, operation)
    return value


def event_to_proto(event: Event, *, sequence: int = 0) -> event_pb2.Event:
    """An Event message."""
    return event_pb2.Event(
        sequence=sequence,
        type=_EVENT_TYPES[event.type],
        node_id=event.node_id,
        agent_id=event.agent_id or "",
        reason=event.reason,
        message=event.message,
        time=timestamp(event.time),
    )


def event_from_proto(message: event_pb2.Event) -> Event:
    """A model event from an Event message (unknown types are refused)."""
    for kind, value in _EVENT_TYPES.items():
        if value == message.type:
            return Event(
                type=kind,
                time=message.time.ToNanoseconds() / 1e9,
                node_id=message.node_id,  # type: ignore[arg-type]
                agent_id=AgentId(message.agent_id) if message.agent_id else None,
                reason=message.reason,
                message=message.message,
            )
    raise InvalidArgument("event.type", f"unknown event type {message.type}")


def resource_point(wall_s: float, cpu: float, memory: int) -> metrics_pb2.ResourceDataPoint:
    """A ResourceDataPoint message."""
    return metrics_pb2.ResourceDataPoint(
        timestamp=timestamp(wall_s), cpu_percent=cpu, memory_bytes=memory
    )


# -- stored JSON documents ---------------------------------------------------------


def message_to_dict(value: message.Message) -> dict[str, Any]:
    """A message in protobuf's canonical JSON mapping (camelCase names, enum names),
    with every field present, so scripts reading it need no defaults: a message field
    not set (an agent not observed yet has no ``info``) is ``None``, not left out."""
    data = json_format.MessageToDict(value, always_print_fields_with_no_presence=True)
    _null_unset_messages(value, data)
    return data


def _null_unset_messages(value: message.Message, data: dict[str, Any]) -> None:
    for field in value.DESCRIPTOR.fields:
        if field.message_type is None or field.containing_oneof is not None:
            continue
        if field.message_type.GetOptions().map_entry:
            continue
        name = field.json_name
        if field.is_repeated:
            for item, item_data in zip(getattr(value, field.name), data.get(name, ()), strict=True):
                if isinstance(item_data, dict):
                    _null_unset_messages(item, item_data)
        elif not value.HasField(field.name):
            data[name] = None
        elif isinstance(data.get(name), dict):  # well-known types map to other JSON
            _null_unset_messages(getattr(value, field.name), data[name])


def message_to_json(value: message.Message) -> str:
    """A message as compact canonical JSON text (defaults omitted)."""
    return json.dumps(json_format.MessageToDict(value), separators=(",", ":"), sort_keys=True)


def message_from_json(text: str, kind: type[M], *, path: str = "document") -> M:
    """A message of type ``kind`` from canonical JSON text; ``InvalidArgument`` when
    the text does not fit it."""
    try:
        return json_format.Parse(text, kind(), ignore_unknown_fields=False)
    except (json_format.ParseError, ValueError) as exc:
        raise InvalidArgument(path, f"not a {kind.DESCRIPTOR.name}: {exc}") from None


def specs_to_json(specs: Sequence[AgentSpec]) -> str:
    """A node's desired agents as a JSON array of ``agent.v1.AgentSpec``."""
    items = [json_format.MessageToDict(spec_to_proto(spec)) for spec in specs]
    return json.dumps(items, separators=(",", ":"), sort_keys=True)


def spec_messages_from_json(text: str, *, path: str = "agents") -> list[agent_pb2.AgentSpec]:
    """The AgentSpec messages of a JSON array written by ``specs_to_json``."""
    try:
        items = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(path, f"not JSON: {exc}") from None
    if not isinstance(items, list):
        raise InvalidArgument(path, "not a JSON array")
    messages = []
    for index, item in enumerate(items):
        try:
            messages.append(json_format.ParseDict(item, agent_pb2.AgentSpec()))
        except (json_format.ParseError, ValueError) as exc:
            raise InvalidArgument(f"{path}[{index}]", f"not an AgentSpec: {exc}") from None
    return messages


def specs_from_json(text: str, *, path: str = "agents") -> tuple[AgentSpec, ...]:
    """The model specs of a JSON array written by ``specs_to_json``."""
    messages = spec_messages_from_json(text, path=path)
    return tuple(spec_from_proto(m, path=f"{path}[{i}]") for i, m in enumerate(messages))


def wall_seconds(stamp: timestamp_pb2.Timestamp) -> float:
    """Unix seconds of a protobuf Timestamp."""
    return stamp.ToNanoseconds() / 1e9


def _key_for(table: Mapping[Any, Any], value: object) -> Any:
    for key, item in table.items():
        if item == value:
            return key
    raise KeyError(value)
