"""The gRPC wire contract in api/proto, as the generated code and the sources show it.

Checks what other code and API users rely on: the message names kept from the original
system, the exact RPCs of each service, buf-style enums, the unit conventions of field
names, and a leading comment on every message, field, enum, enum value, service and RPC
(the .proto comments are the API reference). It does not check that the committed code
is fresh: test_gen_drift.py does.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc  # type: ignore[import-untyped]

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "api" / "proto"
OUR_PACKAGE = "reconciler.api."

FieldType = descriptor_pb2.FieldDescriptorProto

# (module, message) pairs that conversion code and clients import by name.
CONTRACT_MESSAGES = {
    "reconciler.api.agent.v1.agent_pb2": [
        "AgentSpec",
        "HeartbeatSpec",
        "AgentInfo",
        "ExitStatus",
        "Backoff",
        "AgentState",
        "AgentOperationRequest",
        "AgentOperationResponse",
    ],
    "reconciler.api.agent.v1.metrics_pb2": [
        "ResourceDataPoint",
        "MetricData",
        "AgentMetricsRequest",
        "AgentMetricsResponse",
    ],
    "reconciler.api.agent.v1.event_pb2": ["Event"],
    "reconciler.api.agent.v1.node_pb2": ["NodeInfo"],
    "reconciler.api.daemon.v1.daemon_pb2": [
        "ListAgentsRequest",
        "ListAgentsResponse",
        "SyncAgentStatesRequest",
        "SyncAgentStatesResponse",
        "GetConfigRequest",
        "GetConfigResponse",
        "PushUpdateRequest",
        "PushUpdateResponse",
    ],
    "reconciler.api.manager.v1.manager_pb2": [
        "RegisterNodeRequest",
        "RegisterNodeResponse",
        "HeartbeatRequest",
        "HeartbeatResponse",
        "ReportMetricsRequest",
        "ReportMetricsResponse",
        "SyncAgentStatesRequest",
        "SyncAgentStatesResponse",
        "GetDesiredStateRequest",
        "GetDesiredStateResponse",
    ],
    "reconciler.api.fleet.v1.fleet_pb2": [
        "AgentSet",
        "AgentSetMetadata",
        "AgentSetSpec",
        "NodeSelector",
        "NodeChange",
        "ApplyAgentSetRequest",
        "ApplyAgentSetResponse",
        "GetAgentSetRequest",
        "GetAgentSetResponse",
        "ListAgentSetsRequest",
        "ListAgentSetsResponse",
        "DeleteAgentSetRequest",
        "DeleteAgentSetResponse",
        "ListNodesRequest",
        "ListNodesResponse",
        "ListAgentsRequest",
        "ListAgentsResponse",
        "OperateAgentRequest",
        "GetAgentMetricsRequest",
        "WatchEventsRequest",
    ],
}

CONTRACT_SERVICES = {
    "reconciler.api.daemon.v1.DaemonService": {
        "ListAgents",
        "OperateAgent",
        "GetAgentMetrics",
        "SyncAgentStates",
        "GetConfig",
        "PushUpdate",
    },
    "reconciler.api.manager.v1.ManagerService": {
        "RegisterNode",
        "Heartbeat",
        "ReportMetrics",
        "SyncAgentStates",
        "GetDesiredState",
    },
    "reconciler.api.fleet.v1.FleetService": {
        "ApplyAgentSet",
        "GetAgentSet",
        "ListAgentSets",
        "DeleteAgentSet",
        "ListNodes",
        "DeleteNode",
        "ListAgents",
        "OperateAgent",
        "GetAgentMetrics",
        "WatchEvents",
    },
}

SERVER_STREAMING_RPCS = {"reconciler.api.fleet.v1.FleetService.WatchEvents"}

# Field numbers inside descriptor.proto, used to build source-info location paths.
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE = 4, 5, 6
MESSAGE_FIELD, MESSAGE_NESTED, MESSAGE_ENUM = 2, 3, 4
ENUM_VALUE = 2
SERVICE_METHOD = 2


@dataclass(frozen=True)
class Element:
    """One documentable element of a .proto file and its source-info path."""

    kind: str
    full_name: str
    path: tuple[int, ...]


@pytest.fixture(scope="module")
def descriptor_set(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorSet:
    """Every .proto under api/proto compiled with comments, into a temp descriptor set."""
    out = tmp_path_factory.mktemp("descriptors") / "api.pb"
    well_known = resources.files("grpc_tools") / "_proto"
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        "--include_source_info",
        f"--descriptor_set_out={out}",
        *protos,
    ]
    assert protoc.main(args) == 0, "protoc could not compile api/proto"
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def our_files(
    fds: descriptor_pb2.FileDescriptorSet,
) -> Iterator[descriptor_pb2.FileDescriptorProto]:
    """The files of the reconciler API (not the well-known types they import)."""
    return (f for f in fds.file if f.package.startswith(OUR_PACKAGE))


def walk_enum(
    enum: descriptor_pb2.EnumDescriptorProto, prefix: str, path: tuple[int, ...]
) -> Iterator[Element]:
    full = f"{prefix}.{enum.name}"
    yield Element("enum", full, path)
    for i, value in enumerate(enum.value):
        yield Element("enum value", f"{full}.{value.name}", (*path, ENUM_VALUE, i))


def walk_message(
    msg: descriptor_pb2.DescriptorProto, prefix: str, path: tuple[int, ...]
) -> Iterator[Element]:
    if msg.options.map_entry:  # synthetic entry of a map<,> field: no source of its own
        return
    full = f"{prefix}.{msg.name}"
    yield Element("message", full, path)
    for i, field in enumerate(msg.field):
        yield Element("field", f"{full}.{field.name}", (*path, MESSAGE_FIELD, i))
    for i, nested in enumerate(msg.nested_type):
        yield from walk_message(nested, full, (*path, MESSAGE_NESTED, i))
    for i, enum in enumerate(msg.enum_type):
        yield from walk_enum(enum, full, (*path, MESSAGE_ENUM, i))


def walk_file(f: descriptor_pb2.FileDescriptorProto) -> Iterator[Element]:
    for i, msg in enumerate(f.message_type):
        yield from walk_message(msg, f.package, (FILE_MESSAGE, i))
    for i, enum in enumerate(f.enum_type):
        yield from walk_enum(enum, f.package, (FILE_ENUM, i))
    for i, svc in enumerate(f.service):
        full = f"{f.package}.{svc.name}"
        yield Element("service", full, (FILE_SERVICE, i))
        for j, method in enumerate(svc.method):
            yield Element("rpc", f"{full}.{method.name}", (FILE_SERVICE, i, SERVICE_METHOD, j))


def all_enums(
    fds: descriptor_pb2.FileDescriptorSet,
) -> Iterator[tuple[str, descriptor_pb2.EnumDescriptorProto]]:
    def nested(
        msg: descriptor_pb2.DescriptorProto, prefix: str
    ) -> Iterator[tuple[str, descriptor_pb2.EnumDescriptorProto]]:
        for enum in msg.enum_type:
            yield f"{prefix}.{msg.name}.{enum.name}", enum
        for inner in msg.nested_type:
            yield from nested(inner, f"{prefix}.{msg.name}")

    for f in our_files(fds):
        for enum in f.enum_type:
            yield f"{f.package}.{enum.name}", enum
        for msg in f.message_type:
            yield from nested(msg, f.package)


def all_fields(
    fds: descriptor_pb2.FileDescriptorSet,
) -> Iterator[tuple[str, descriptor_pb2.FieldDescriptorProto]]:
    def fields(
        msg: descriptor_pb2.DescriptorProto, prefix: str
    ) -> Iterator[tuple[str, descriptor_pb2.FieldDescriptorProto]]:
        for field in msg.field:
            yield f"{prefix}.{msg.name}.{field.name}", field
        for inner in msg.nested_type:
            yield from fields(inner, f"{prefix}.{msg.name}")

    for f in our_files(fds):
        for msg in f.message_type:
            yield from fields(msg, f.package)


def upper_snake(camel: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).upper()


@pytest.mark.parametrize(
    ("module_name", "message_name"),
    [
        pytest.param(module, message, id=f"{module.rsplit('.', 1)[0]}.{message}")
        for module, messages in CONTRACT_MESSAGES.items()
        for message in messages
    ],
)
def test_contract_message_is_importable_from_generated_code(
    module_name: str, message_name: str
) -> None:
    module = importlib.import_module(module_name)
    message_class = getattr(module, message_name)
    package = module_name.rsplit(".", 1)[0]
    assert message_class.DESCRIPTOR.full_name == f"{package}.{message_name}"


@pytest.mark.parametrize(
    ("service_name", "expected_rpcs"),
    [
        pytest.param(name, rpcs, id=name.rsplit(".", 1)[1])
        for name, rpcs in CONTRACT_SERVICES.items()
    ],
)
def test_service_has_exactly_the_contract_rpcs(service_name: str, expected_rpcs: set[str]) -> None:
    package, service = service_name.rsplit(".", 1)
    module = importlib.import_module(f"{package}.{package.split('.')[-2]}_pb2")
    descriptor = module.DESCRIPTOR.services_by_name[service]
    assert {m.name for m in descriptor.methods} == expected_rpcs


def test_generated_code_defines_no_service_outside_the_contract(
    descriptor_set: descriptor_pb2.FileDescriptorSet,
) -> None:
    services = {f"{f.package}.{s.name}" for f in our_files(descriptor_set) for s in f.service}
    assert services == set(CONTRACT_SERVICES)


def test_only_watch_events_streams_and_no_rpc_streams_requests(
    descriptor_set: descriptor_pb2.FileDescriptorSet,
) -> None:
    streaming = set()
    for f in our_files(descriptor_set):
        for svc in f.service:
            for method in svc.method:
                assert not method.client_streaming, f"{svc.name}.{method.name}"
                if method.server_streaming:
                    streaming.add(f"{f.package}.{svc.name}.{method.name}")
    assert streaming == SERVER_STREAMING_RPCS


def test_every_enum_value_zero_is_unspecified_and_values_carry_the_enum_prefix(
    descriptor_set: descriptor_pb2.FileDescriptorSet,
) -> None:
    enums = dict(all_enums(descriptor_set))
    assert len(enums) >= 7
    for full_name, enum in enums.items():
        prefix = upper_snake(enum.name)
        zero = [v.name for v in enum.value if v.number == 0]
        assert zero == [f"{prefix}_UNSPECIFIED"], full_name
        for value in enum.value:
            assert value.name.startswith(f"{prefix}_"), f"{full_name}.{value.name}"


def test_agent_phase_lists_the_eight_phases_and_unknown(
    descriptor_set: descriptor_pb2.FileDescriptorSet,
) -> None:
    phases = dict(all_enums(descriptor_set))["reconciler.api.agent.v1.AgentPhase"]
    names = {v.name.removeprefix("AGENT_PHASE_") for v in phases.value}
    assert names == {
        "UNSPECIFIED",
        "PENDING",
        "STARTING",
        "RUNNING",
        "DEGRADED",
        "BACKOFF",
        "STOPPING",
        "STOPPED",
        "FAILED",
        "UNKNOWN",
    }


def test_every_proto_package_is_its_directory_so_imports_need_no_rewriting(
    descriptor_set: descriptor_pb2.FileDescriptorSet,
) -> None:
    files = list(our_files(descriptor_set))
    assert files
    for f in files:
        assert f.package == str(Path(f.name).parent).replace("/", "."), f.name


def test_every_element_has_a_leading_comment(
    descriptor_set: descriptor_pb2.FileDescriptorSet,
) -> None:
    undocumented = []
    for f in our_files(descriptor_set):
        comments = {
            tuple(loc.path): loc.leading_comments.strip() for loc in f.source_code_info.location
        }
        for element in walk_file(f):
            if not comments.get(element.path):
                undocumented.append(f"{f.name}: {element.kind} {element.full_name}")
    assert undocumented == []


@pytest.mark.parametrize(
    ("suffix", "wanted_type", "wanted_message"),
    [
        pytest.param("generation", FieldType.TYPE_UINT64, "", id="generations-are-uint64"),
        pytest.param("_seconds", FieldType.TYPE_DOUBLE, "", id="durations-are-double-seconds"),
        pytest.param("_bytes", FieldType.TYPE_UINT64, "", id="sizes-are-uint64-bytes"),
        pytest.param(
            "_at", FieldType.TYPE_MESSAGE, ".google.protobuf.Timestamp", id="times-are-timestamps"
        ),
    ],
)
def test_field_name_suffix_fixes_its_type(
    descriptor_set: descriptor_pb2.FileDescriptorSet,
    suffix: str,
    wanted_type: int,
    wanted_message: str,
) -> None:
    matching = [(n, f) for n, f in all_fields(descriptor_set) if f.name.endswith(suffix)]
    assert matching, f"no field ends in {suffix}"
    for name, field in matching:
        assert field.type == wanted_type, name
        assert field.type_name == wanted_message, name


def test_agent_spec_round_trips_every_model_field() -> None:
    agent_pb2 = importlib.import_module("reconciler.api.agent.v1.agent_pb2")
    spec = agent_pb2.AgentSpec(
        id="shipper",
        command=["/usr/bin/python3", "-m", "shipper"],
        env={"LOG_LEVEL": "info"},
        working_dir="/var/lib/shipper",
        version="1.4.2",
        state=agent_pb2.DESIRED_STATE_RUNNING,
        restart_policy=agent_pb2.RESTART_POLICY_ALWAYS,
        heartbeat=agent_pb2.HeartbeatSpec(interval_seconds=5.0, timeout_seconds=15.0),
        stop_grace_period_seconds=10.0,
        labels={"team": "obs"},
        user="shipper",
    )
    spec.config.update({"batch": 500, "targets": ["a", "b"]})
    decoded = agent_pb2.AgentSpec.FromString(spec.SerializeToString())
    assert decoded == spec
    assert decoded.HasField("heartbeat")
    assert not agent_pb2.AgentSpec(id="plain").HasField("heartbeat")
