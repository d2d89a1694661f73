"""The real daemon process against hostile local callers and hostile desired states.

Heartbeats: another uid cannot reach the socket at all; a same-uid process that is
not the agent cannot heartbeat for it (refused, counted) unless it holds the agent's
token. Desired states: arguments are never given to a shell (a canary file never
appears), programs outside the allow-list and variables that change how code is
loaded are refused before anything runs, agents run as the user their spec names,
and gRPC messages too large or too deep are refused while the daemon keeps serving.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from reconciler.api.agent.v1 import agent_pb2
from reconciler.api.daemon.v1 import daemon_pb2
from tests.support.daemon import DaemonProcess, free_port, spec, wait_for

__all__: list[str] = []

NOBODY = 65534
pytestmark = pytest.mark.slow


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(
        tmp_path / "daemon", settings={"metrics": {"listen": f"127.0.0.1:{free_port()}"}}
    )
    process.start()
    try:
        yield process
    finally:
        process.close()


def rejected(daemon: DaemonProcess, reason: str) -> float:
    """reconciler_heartbeats_rejected for the Unix socket and ``reason``."""
    address = daemon.settings["metrics"]["listen"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    for line in text.splitlines():
        if line.startswith("reconciler_heartbeats_rejected_total{") and (
            f'reason="{reason}"' in line and 'transport="unix"' in line
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def agent_token(pid: int) -> str:
    """The token the daemon handed the agent, read from its environment."""
    with open(f"/proc/{pid}/environ", "rb") as environ:
        for entry in environ.read().split(b"\0"):
            if entry.startswith(b"RECONCILER_AGENT_TOKEN="):
                return entry.split(b"=", 1)[1].decode()
    raise AssertionError(f"agent {pid} has no token")


def heartbeat_line(agent_id: str, pid: int, token: str | None = None) -> bytes:
    body: dict[str, object] = {
        "agent_id": agent_id,
        "pid": pid,
        "timestamp": 1.0,
        "version": "1",
        "status": "healthy",
        "cpu": 0.0,
        "memory": 0,
    }
    if token is not None:
        body["token"] = token
    return json.dumps(body).encode() + b"\n"


def send(path: Path, line: bytes) -> bytes:
    """Send one line; the daemon's answer (empty when it accepted and kept listening)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(os.fspath(path))
        sock.sendall(line)
        sock.shutdown(socket.SHUT_WR)
        return sock.recv(4096)


def connect_as_nobody(path: Path) -> str:
    """Fork a child that drops to nobody and tries to connect; what it met."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        outcome = b"connected"
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(os.fspath(path))
                sock.sendall(b"{}\n")
        except PermissionError:
            outcome = b"permission-denied"
        except OSError as exc:
            outcome = f"error {exc.errno}".encode()
        os.write(write_end, outcome)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        outcome = pipe.read().decode()
    os.waitpid(child, 0)
    return outcome


def running_pid(daemon: DaemonProcess, agent_id: str) -> int:
    return int(wait_for(lambda: daemon.running().get(agent_id), what=f"{agent_id} running"))


# -------------------------------------------------------------- heartbeat socket


@pytest.fixture
def reachable_socket_dir() -> Iterator[Path]:
    """A directory every uid may traverse (pytest's own tmp_path is 0700, which would
    hide the socket from another uid whatever its mode)."""
    directory = Path(tempfile.mkdtemp(prefix="reconciler-sec-"))
    directory.chmod(0o711)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root")
def test_another_uid_cannot_reach_the_heartbeat_socket(
    tmp_path: Path, reachable_socket_dir: Path
) -> None:
    socket_path = reachable_socket_dir / "run" / "heartbeat.sock"
    daemon = DaemonProcess(
        tmp_path / "daemon", settings={"heartbeat": {"socket_path": str(socket_path)}}
    )
    daemon.start()
    try:
        assert connect_as_nobody(socket_path) == "permission-denied"
        # Even with the private directory opened up, the socket's own mode keeps it out.
        socket_path.parent.chmod(0o755)
        assert connect_as_nobody(socket_path) == "permission-denied"
    finally:
        daemon.close()


def test_an_impostor_claiming_another_agents_id_is_refused_and_counted(
    daemon: DaemonProcess,
) -> None:
    daemon.sync(1, [spec("victim"), spec("other")])
    victim, other = running_pid(daemon, "victim"), running_pid(daemon, "other")
    before = rejected(daemon, "forbidden")

    without_token = send(daemon.socket_path, heartbeat_line("victim", victim))
    with_other_token = send(
        daemon.socket_path, heartbeat_line("victim", victim, agent_token(other))
    )

    for answer in (without_token, with_other_token):
        assert json.loads(answer) == {"error": "forbidden", "field": "agent_id"}
    assert rejected(daemon, "forbidden") == before + 2


def test_the_agents_own_token_is_accepted_from_another_process(daemon: DaemonProcess) -> None:
    daemon.sync(1, [spec("victim")])
    victim = running_pid(daemon, "victim")
    before = rejected(daemon, "forbidden")
    answer = send(daemon.socket_path, heartbeat_line("victim", victim, agent_token(victim)))
    assert answer == b""
    assert rejected(daemon, "forbidden") == before


# ---------------------------------------------------------------- desired states


def invalid_argument(daemon: DaemonProcess, agent: agent_pb2.AgentSpec) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        daemon.sync(1, [agent])
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    return caught.value.details() or ""


SHELL_TRICKS = ["; touch {c}", "$(touch {c})", "`touch {c}`", "| touch {c}", "&& touch {c}"]


def test_shell_metacharacters_in_arguments_are_only_bytes(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    canary = tmp_path / "canary"
    arguments = [trick.format(c=canary) for trick in SHELL_TRICKS]
    daemon.sync(
        1, [spec("echo", ["/bin/echo", *arguments], restart_policy=agent_pb2.RESTART_POLICY_NEVER)]
    )
    wait_for(
        lambda: (
            daemon.agents()["echo"].phase
            in {agent_pb2.AGENT_PHASE_STOPPED, agent_pb2.AGENT_PHASE_FAILED}
        ),
        what="echo to exit",
    )
    assert not canary.exists()
    details = invalid_argument(daemon, spec("sh", [f"touch {canary}"]))
    assert "agents[0].command[0]" in details
    assert not canary.exists()


def test_a_program_outside_the_allow_list_is_refused_before_it_runs(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    canary = tmp_path / "canary"
    tool = tmp_path / "tool"
    tool.write_text(f"#!/bin/sh\ntouch {canary}\n")
    tool.chmod(0o755)
    details = invalid_argument(daemon, spec("tool", [str(tool)]))
    assert "agents[0].command[0]" in details
    assert "allowed_commands" in details
    assert "tool" not in daemon.agents()
    assert not canary.exists()


HOSTILE_ENV = ["LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "PYTHONPATH", "GCONV_PATH"]


@pytest.mark.parametrize("name", HOSTILE_ENV)
def test_a_variable_that_changes_how_code_is_loaded_is_refused(
    daemon: DaemonProcess, name: str
) -> None:
    details = invalid_argument(daemon, spec("env", env={name: "/tmp/evil.so"}))
    assert f"agents[0].env[{name}]" in details
    assert "env" not in daemon.agents()


@pytest.mark.skipif(os.geteuid() != 0, reason="running an agent as another user needs root")
def test_an_agent_runs_as_the_unprivileged_user_its_spec_names(daemon: DaemonProcess) -> None:
    daemon.sync(1, [spec("unprivileged", user="nobody")])
    pid = running_pid(daemon, "unprivileged")
    status = Path(f"/proc/{pid}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    gids = next(line for line in status.splitlines() if line.startswith("Gid:")).split()[1:]
    assert uids == [str(NOBODY)] * 4
    assert gids == [str(NOBODY)] * 4


# ------------------------------------------------------------------ gRPC bounds


def length_delimited(field: int, payload: bytes) -> bytes:
    """One protobuf field of wire type 2 (bytes, string or message)."""
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def nested_struct_bytes(depth: int) -> bytes:
    """A Struct holding a Struct ... ``depth`` deep, encoded by hand: the protobuf
    library refuses to build one this deep, which is the point."""
    inner = b""
    for _ in range(depth):
        value = length_delimited(5, inner)  # Value.struct_value
        entry = length_delimited(1, b"n") + length_delimited(2, value)
        inner = length_delimited(1, entry)  # Struct.fields
    return inner


def test_a_message_over_the_size_limit_is_resource_exhausted_and_serving_goes_on(
    daemon: DaemonProcess,
) -> None:
    big = spec("big", env={"BIG": "x" * 5 * 1024 * 1024})
    with pytest.raises(grpc.RpcError) as caught:
        daemon.sync(1, [big])
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    daemon.sync(1, [spec("after")])
    running_pid(daemon, "after")


def test_a_message_nested_too_deep_is_invalid_argument_and_serving_goes_on(
    daemon: DaemonProcess,
) -> None:
    agent = spec("deep").SerializeToString() + length_delimited(10, nested_struct_bytes(200))
    header = daemon_pb2.SyncAgentStatesRequest(node_id=daemon.node_id, generation=1)
    request = header.SerializeToString() + length_delimited(3, agent)
    with daemon.channel() as channel:
        call = channel.unary_unary(
            "/reconciler.api.daemon.v1.DaemonService/SyncAgentStates",
            request_serializer=bytes,
            response_deserializer=daemon_pb2.SyncAgentStatesResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as caught:
            call(request, timeout=30)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "request: cannot be decoded" in (caught.value.details() or "")
    daemon.sync(1, [spec("after")])
    running_pid(daemon, "after")
