"""Properties of the input surfaces the fuzz targets cover, checked with hypothesis.

Where the fuzzers search for one bad input by coverage, these state the promises as
properties over generated inputs: a surface raises only its own rejection, a valid
heartbeat survives encode then decode, the frame reader never holds more than one
frame of an unfinished line, and chunking never changes what it accepts.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from fuzz import targets
from reconciler.config import ConfigError, load_daemon_settings, load_manager_settings
from reconciler.daemon.heartbeat.codec import (
    MAX_CPU_PERCENT,
    MAX_MEMORY_BYTES,
    MAX_PID,
    MAX_SEQ,
    MAX_VERSION_CHARS,
    HeartbeatError,
    decode_heartbeat,
)
from reconciler.daemon.heartbeat.contract import RejectReason
from reconciler.daemon.heartbeat.unix import error_line
from reconciler.manager.agentset import AgentSetFileError, parse_agent_sets
from reconciler.model.heartbeat import ReportedStatus
from reconciler.model.ids import AGENT_ID_PATTERN

__all__: list[str] = []

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
FIELDS = ["agent_id", "pid", "timestamp", "version", "status", "cpu", "memory", "seq", "token"]

VALID_HEARTBEATS = st.fixed_dictionaries(
    {
        "agent_id": st.from_regex(AGENT_ID_PATTERN, fullmatch=True),
        "pid": st.integers(1, MAX_PID),
        "timestamp": st.floats(0, 1e15, allow_nan=False),
        "version": st.text(
            st.characters(codec="utf-8", categories=["L", "N", "P", "S"], include_characters=" "),
            max_size=MAX_VERSION_CHARS,
        ),
        "status": st.sampled_from([str(status) for status in ReportedStatus]),
        "cpu": st.floats(0, MAX_CPU_PERCENT, allow_nan=False),
        "memory": st.integers(0, MAX_MEMORY_BYTES),
    },
    optional={"seq": st.integers(0, MAX_SEQ), "token": st.text(max_size=64)},
)


@given(st.binary(max_size=2048))
def test_decoding_any_bytes_raises_nothing_but_a_heartbeat_error(data: bytes) -> None:
    error: HeartbeatError | None = None
    try:
        decode_heartbeat(data)
    except HeartbeatError as exc:
        error = exc
    assert error is None or error.reason in set(RejectReason)


@given(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), JSON, max_size=10))
def test_decoding_any_json_object_raises_nothing_but_a_heartbeat_error(
    document: dict[str, Any],
) -> None:
    targets.heartbeat(msgspec.json.encode(document))


@given(VALID_HEARTBEATS)
def test_a_valid_heartbeat_survives_encode_then_decode(wire: dict[str, Any]) -> None:
    decoded, token = decode_heartbeat(msgspec.json.encode(wire), max_bytes=1 << 20)
    assert decoded.agent_id == wire["agent_id"]
    assert decoded.pid == wire["pid"]
    assert decoded.timestamp == wire["timestamp"]
    assert decoded.version == wire["version"]
    assert decoded.status == wire["status"]
    assert math.isclose(decoded.cpu_percent, wire["cpu"])
    assert decoded.memory_bytes == wire["memory"]
    assert decoded.seq == wire.get("seq")
    assert token == wire.get("token")


@given(st.binary(max_size=1500))
def test_the_frame_reader_outcome_never_depends_on_how_bytes_are_chunked(data: bytes) -> None:
    targets.frame(data)


@given(
    st.lists(st.binary(min_size=1, max_size=200).map(lambda b: b.replace(b"\n", b"")), max_size=8)
)
def test_the_frame_reader_never_buffers_a_whole_frame_of_an_unfinished_line(
    chunks: list[bytes],
) -> None:
    stream = b"".join(chunks)
    cuts = bytes(min(255, 255 * i // max(1, len(chunks))) for i in range(1, len(chunks)))
    cut_count = len(cuts) % 8
    # frame() checks the buffer after every chunk and that the outcome is the one below.
    targets.frame(bytes([cut_count]) + cuts[:cut_count] + stream)
    too_large = error_line(RejectReason.TOO_LARGE, None)
    expected = too_large if len(stream) >= targets.FRAME_LIMIT_BYTES else None
    assert targets._expected_frames(stream) == ([], expected)


ARGS = st.text(max_size=12)


@given(
    program=st.sampled_from(["agent", "escape", "data", "dir", "sleep", "sh", "../x"]) | ARGS,
    args=st.lists(ARGS | st.sampled_from(["; touch canary", "$(id)", "`id`", "|", "&&"])),
    env=st.dictionaries(st.sampled_from(["LD_PRELOAD", "PATH", "HOME", "X"]) | ARGS, ARGS),
    pick=st.integers(0, 255),
)
def test_command_validation_raises_nothing_but_invalid_argument(
    program: str, args: list[str], env: dict[str, str], pick: int
) -> None:
    argv = "\t".join([program.replace("\t", ""), *(a.replace("\t", "") for a in args)])
    env_lines = "\n".join(f"{name}={value}" for name, value in env.items())
    text = chr(pick) + "\n" + argv.replace("\n", "") + "\n" + env_lines
    targets.command(text.encode("utf-8", "surrogateescape"))


SECTIONS = st.sampled_from(
    ["node", "grpc", "tls", "heartbeat", "agents", "store", "monitor", "logging", "bogus"]
)
SETTINGS_DOCUMENTS = st.dictionaries(
    SECTIONS | st.text(max_size=8), st.dictionaries(st.text(max_size=20), JSON) | JSON
)


@pytest.mark.parametrize(
    "load", [load_daemon_settings, load_manager_settings], ids=["daemon", "manager"]
)
@given(document=SETTINGS_DOCUMENTS | JSON)
def test_loading_any_yaml_settings_raises_nothing_but_a_config_error(
    tmp_path_factory: pytest.TempPathFactory, load: Any, document: Any
) -> None:
    path: Path = tmp_path_factory.mktemp("settings") / "settings.yaml"
    path.write_text(yaml.safe_dump(document))
    path.chmod(0o600)
    problem = ""
    try:
        load(path, env={})
    except ConfigError as exc:
        problem = str(exc)
    assert not problem or str(path) in problem


@given(st.binary(max_size=512))
def test_loading_any_bytes_as_settings_raises_nothing_but_a_config_error(data: bytes) -> None:
    targets.config(data)


AGENT_SET_DOCUMENTS = st.fixed_dictionaries(
    {
        "apiVersion": st.sampled_from(["reconciler.dev/v1", "v2"]) | JSON_SCALARS,
        "kind": st.sampled_from(["AgentSet", "Pod"]) | JSON_SCALARS,
        "metadata": st.fixed_dictionaries({"name": st.text(max_size=10)}) | JSON,
        "spec": st.dictionaries(
            st.sampled_from(["nodeSelector", "agents", "replicas", "bogus"]),
            st.lists(
                st.dictionaries(
                    st.sampled_from(["id", "command", "env", "restartPolicy", "heartbeat"]),
                    JSON,
                ),
                max_size=3,
            )
            | JSON,
        ),
    }
)


@given(AGENT_SET_DOCUMENTS | JSON)
def test_parsing_any_agentset_yaml_raises_nothing_but_an_agentset_file_error(
    document: Any,
) -> None:
    problem = ""
    try:
        parse_agent_sets(yaml.safe_dump(document), source="sets.yaml")
    except AgentSetFileError as exc:
        problem = str(exc)
    assert not problem or problem.startswith("sets.yaml")


def test_the_frame_target_runs_on_its_own_loop_not_the_tests() -> None:
    targets.frame(b"\x00")
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()
