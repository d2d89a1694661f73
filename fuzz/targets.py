"""Fuzz targets: one function per input surface, each taking the raw bytes of one input.

What: every target feeds hostile bytes to one parser or validator and lets only the
error that surface promises escape as a rejection (``HeartbeatError``,
``InvalidArgument``, ``ConfigError``, ``AgentSetFileError``); anything else raised,
and any broken invariant (an ``AssertionError`` raised here), is a finding. Inputs are
decoded from bytes by simple, readable rules (no atheris data provider), so the
committed corpus is replayed by ``tests/fuzz/test_corpus_replay.py`` without atheris.

Targets:

- ``heartbeat``: ``decode_heartbeat``; an accepted object must also be one the
  stdlib parser reads with the same values (no duplicate keys, no lost field);
- ``frame``: the Unix-socket connection's line splitting, limits and validation,
  driven through its ``asyncio.Protocol`` callbacks with a fake transport; the bytes
  are cut into chunks and the outcome must equal that of the unchunked stream;
- ``command``: ``validate_spec`` then ``CommandPolicy.resolve`` on an argv and an env
  against a small sandbox of files; anything resolved must be allowed and executable;
- ``config``: ``load_settings`` for the daemon and the Manager on the bytes as a file;
- ``agentset``: ``parse_agent_sets`` on the bytes as text; what it accepts must pass
  ``check_agent_set`` again and survive a protobuf round trip.

What not: no atheris (``fuzz/__main__.py`` runs these under it), no corpus handling.
"""

from __future__ import annotations

import asyncio
import atexit
import fnmatch
import itertools
import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import msgspec

from reconciler.config import (
    ConfigError,
    load_daemon_settings,
    load_manager_settings,
    settings_to_dict,
)
from reconciler.daemon.commands import CommandPolicy
from reconciler.daemon.heartbeat.codec import HeartbeatError, decode_heartbeat
from reconciler.daemon.heartbeat.contract import (
    AgentIdentity,
    FakeAgentDirectory,
    RecordingSink,
    RejectReason,
)
from reconciler.daemon.heartbeat.identity import tokens_match
from reconciler.daemon.heartbeat.unix import (
    UnixHeartbeatReceiver,
    UnixReceiverConfig,
    _Connection,
)
from reconciler.manager.agentset import AgentSetFileError, check_agent_set, parse_agent_sets
from reconciler.model.errors import InvalidArgument
from reconciler.model.ids import AgentId, is_valid_agent_id
from reconciler.model.spec import FORBIDDEN_ENV_NAMES, AgentSpec, validate_spec

__all__ = [
    "FRAME_AGENTS",
    "FRAME_LIMIT_BYTES",
    "TARGETS",
    "agentset",
    "command",
    "config",
    "frame",
    "heartbeat",
]


# ------------------------------------------------------------------ heartbeat


def heartbeat(data: bytes) -> None:
    """Decode one heartbeat object; what is accepted must be plain, valid JSON."""
    try:
        decoded, token = decode_heartbeat(data)
    except HeartbeatError:
        return
    plain = json.loads(data, object_pairs_hook=_no_duplicates)
    assert isinstance(plain, dict), "accepted something that is not an object"
    assert is_valid_agent_id(decoded.agent_id)
    assert plain["agent_id"] == decoded.agent_id
    assert plain["pid"] == decoded.pid and not isinstance(plain["pid"], bool)
    assert math.isfinite(decoded.timestamp) and float(plain["timestamp"]) == decoded.timestamp
    assert plain["version"] == decoded.version and decoded.version.isprintable()
    assert plain["status"] == decoded.status
    assert float(plain["cpu"]) == decoded.cpu_percent
    assert plain["memory"] == decoded.memory_bytes
    assert plain.get("seq") == decoded.seq
    assert plain.get("token") == token
    _round_trip(decoded, token)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    assert len(keys) == len(set(keys)), f"accepted duplicate keys {keys}"
    return dict(pairs)


def _round_trip(decoded: Any, token: str | None) -> None:
    wire: dict[str, Any] = {
        "agent_id": decoded.agent_id,
        "pid": decoded.pid,
        "timestamp": decoded.timestamp,
        "version": decoded.version,
        "status": decoded.status,
        "cpu": decoded.cpu_percent,
        "memory": decoded.memory_bytes,
    }
    if decoded.seq is not None:
        wire["seq"] = decoded.seq
    if token is not None:
        wire["token"] = token
    again, again_token = decode_heartbeat(msgspec.json.encode(wire), max_bytes=1 << 20)
    assert again == decoded and again_token == token, "encode then decode changed it"


# ---------------------------------------------------------------------- frame

#: The frame limit (a line and its newline) of the receiver under test: small, so
#: the fuzzer reaches it with short inputs.
FRAME_LIMIT_BYTES: Final = 256
_LINES_PER_TURN: Final = 3
#: Agents the frame target knows, with their tokens (pids unknown: token checks only).
FRAME_AGENTS: Final = {"a1": "t1", "a2": "t2"}
_MAX_CUTS: Final = 8


class _FakeTransport(asyncio.Transport):
    """Records what the connection writes; honours pause and close."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed = False
        self.paused = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "wrote after closing"
        self.written.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_reading(self) -> bool:
        return not self.paused

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


_loop: asyncio.AbstractEventLoop | None = None


def frame(data: bytes) -> None:
    """Cut the stream into chunks as ``data`` says; the outcome must not depend on it."""
    if not data:
        return
    cut_count = data[0] % _MAX_CUTS
    stream = data[1 + cut_count :]
    cuts = sorted({byte * len(stream) // 255 for byte in data[1 : 1 + cut_count]})
    bounds = [0, *cuts, len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
    accepted, error = _loop.run_until_complete(_feed(chunks))
    assert (accepted, error) == _expected_frames(stream), "chunking changed the outcome"


async def _feed(chunks: list[bytes]) -> tuple[list[Any], bytes | None]:
    sink = RecordingSink()
    receiver = UnixHeartbeatReceiver(
        UnixReceiverConfig(
            socket_path=Path("/nonexistent/heartbeat.sock"),
            max_frame_bytes=FRAME_LIMIT_BYTES,
            lines_per_turn=_LINES_PER_TURN,
        ),
        directory=FakeAgentDirectory(
            {name: AgentIdentity(pid=None, token=token) for name, token in FRAME_AGENTS.items()}
        ),
        sink=sink,
    )
    transport = _FakeTransport()
    connection = _Connection(receiver)
    connection.connection_made(transport)
    for chunk in chunks:
        await _until_reading(transport)
        if transport.closed:
            break
        connection.data_received(chunk)
        _check_buffered(connection, transport)
    await _until_reading(transport)
    connection.connection_lost(None)
    assert not receiver.connections and receiver.counters.open_connections == 0
    assert len(transport.written) <= 1, "more than one answer"
    assert receiver.counters.accepted == len(sink.records)
    error = transport.written[0] if transport.written else None
    assert error is None or transport.closed, "answered without closing"
    return [record.heartbeat for record in sink.records], error


async def _until_reading(transport: _FakeTransport) -> None:
    for _ in range(10_000):
        if not transport.paused or transport.closed:
            return
        await asyncio.sleep(0)
    raise AssertionError("the connection never resumed reading")


def _check_buffered(connection: _Connection, transport: _FakeTransport) -> None:
    if transport.paused or transport.closed:
        return
    buffered = len(connection._partial)
    assert buffered < FRAME_LIMIT_BYTES, f"buffered {buffered} bytes of one line"


def _expected_frames(stream: bytes) -> tuple[list[Any], bytes | None]:
    """What the receiver must do with ``stream`` handed over in one piece."""
    from reconciler.daemon.heartbeat.unix import error_line

    lines = stream.split(b"\n")
    tail = lines.pop()
    accepted: list[Any] = []
    for line in lines:
        if len(line) >= FRAME_LIMIT_BYTES:
            return accepted, error_line(RejectReason.TOO_LARGE, None)
        try:
            decoded, token = decode_heartbeat(line, max_bytes=FRAME_LIMIT_BYTES - 1)
        except HeartbeatError as exc:
            return accepted, error_line(exc.reason, exc.field)
        known = FRAME_AGENTS.get(decoded.agent_id)
        if known is None:
            return accepted, error_line(RejectReason.UNKNOWN_AGENT, "agent_id")
        if token is None or not tokens_match(token, known):
            return accepted, error_line(RejectReason.FORBIDDEN, "agent_id")
        accepted.append(decoded)
    if len(tail) >= FRAME_LIMIT_BYTES:
        return accepted, error_line(RejectReason.TOO_LARGE, None)
    return accepted, None


# -------------------------------------------------------------------- command

_sandbox: Path | None = None
#: argv[0] prefixes the first character of the header picks (the sandbox paths vary).
_PREFIXES: Final = ("", "{allowed}/", "{outside}/", "/bin/", "/usr/bin/", "../", "{allowed}/../")


def _make_sandbox() -> Path:
    root = Path(tempfile.mkdtemp(prefix="reconciler-fuzz-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir()
    outside.mkdir()
    for directory in (allowed, outside):
        (directory / "agent").write_bytes(b"#!/bin/sh\nexit 0\n")
        (directory / "agent").chmod(0o755)
        (directory / "data").write_bytes(b"not a program\n")
        (directory / "data").chmod(0o644)
        (directory / "dir").mkdir()
    (allowed / "escape").symlink_to(outside / "agent")
    (allowed / "inside").symlink_to(allowed / "agent")
    (allowed / "dangling").symlink_to(root / "missing")
    return root


def command(data: bytes) -> None:
    """Header line (prefix, allow-list), argv line (tab-separated), env lines (NAME=VALUE)."""
    global _sandbox
    if _sandbox is None:
        _sandbox = _make_sandbox()
    text = data.decode("utf-8", "surrogateescape")
    header, _, rest = text.partition("\n")
    argv_line, _, env_text = rest.partition("\n")
    argv = argv_line.split("\t")
    pick = ord(header[0]) if header else 0
    prefix = _PREFIXES[pick % len(_PREFIXES)].format(
        allowed=_sandbox / "allowed", outside=_sandbox / "outside"
    )
    argv[0] = prefix + argv[0]
    env = dict(line.partition("=")[::2] for line in env_text.split("\n") if line)
    patterns = [f"{_sandbox}/allowed/*", "/bin/*", "/usr/bin/*"][: 1 + pick // 8 % 3]
    _check_command(argv, env, patterns, allow_any=pick // 32 % 2 == 1)


def _check_command(
    argv: list[str], env: dict[str, str], patterns: list[str], *, allow_any: bool
) -> None:
    spec = AgentSpec(id=AgentId("fuzz"), command=tuple(argv), env=env)
    try:
        validate_spec(spec)
    except InvalidArgument as exc:
        assert exc.field.startswith("agent."), exc.field
        return
    for name in env:
        assert name not in FORBIDDEN_ENV_NAMES and not name.startswith("LD_"), name
        assert not name.startswith("RECONCILER_") and "=" not in name, name
    policy = CommandPolicy(patterns, allow_any, search_path="/usr/bin:/bin")
    try:
        resolved = policy.resolve(spec.command, field="agent.command")
    except InvalidArgument as exc:
        assert exc.field in {"agent.command", "agent.command[0]"}, exc.field
        return
    program = resolved[0]
    assert resolved[1:] == spec.command[1:], "arguments changed"
    assert program.startswith("/") and os.path.normpath(program) == program, program
    real = os.path.realpath(program)
    if not allow_any:
        for path in (program, real):
            assert any(fnmatch.fnmatchcase(path, p) for p in patterns), f"{path} not allowed"
    info = os.stat(real)
    assert stat.S_ISREG(info.st_mode) and os.access(real, os.X_OK), f"{program} cannot run"


# --------------------------------------------------------------------- config

_config_file: Path | None = None


def config(data: bytes) -> None:
    """Load the bytes as a daemon and as a Manager settings file (no environment)."""
    global _config_file
    if _config_file is None:
        descriptor, name = tempfile.mkstemp(prefix="reconciler-fuzz-", suffix=".yaml")
        os.close(descriptor)
        _config_file = Path(name)
        atexit.register(_config_file.unlink, missing_ok=True)
    _config_file.write_bytes(data)
    for load in (load_daemon_settings, load_manager_settings):
        try:
            settings: Any = load(_config_file, env={})
        except ConfigError as exc:
            assert str(exc), "an error without a message"
            continue
        plain = settings_to_dict(settings, redact=True)
        assert isinstance(plain, dict)


# ------------------------------------------------------------------- agentset


def agentset(data: bytes) -> None:
    """Parse the bytes as an AgentSet file; what passes must pass again unchanged."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    try:
        messages = parse_agent_sets(text, source="fuzz.yaml")
    except AgentSetFileError as exc:
        assert str(exc), "an error without a message"
        return
    for message in messages:
        again = type(message).FromString(message.SerializeToString())
        assert again == message, "the protobuf round trip changed the AgentSet"
        assert check_agent_set(again).message == message


TARGETS: Final[dict[str, Callable[[bytes], None]]] = {
    "heartbeat": heartbeat,
    "frame": frame,
    "command": command,
    "config": config,
    "agentset": agentset,
}
