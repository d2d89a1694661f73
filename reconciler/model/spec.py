"""What should run: the desired state of one agent and of one node.

``AgentSpec`` is the unit a daemon converges to. ``NodeDesiredState`` is what the
Manager pushes to a node: a generation number and the node's specs. Validation here
is the part that needs no I/O (shape, ids, NUL bytes, hostile environment names);
resolving ``command[0]`` through PATH and checking the local allow-list happens in
``reconciler.daemon.commands``, because it reads the file system.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from reconciler.model.errors import InvalidArgument
from reconciler.model.ids import AgentId, Generation, is_valid_agent_id

__all__ = [
    "FORBIDDEN_ENV_NAMES",
    "AgentSpec",
    "DesiredState",
    "HeartbeatSpec",
    "NodeDesiredState",
    "RestartPolicy",
    "validate_node_state",
    "validate_spec",
]

#: Environment names an AgentSpec may not set: they change how the dynamic linker or
#: an interpreter loads code, which would let a remote spec run code the allow-list
#: never saw.
FORBIDDEN_ENV_NAMES = frozenset(
    {
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "LD_AUDIT",
        "LD_DEBUG_OUTPUT",
        "LD_PROFILE",
        "GCONV_PATH",
        "PYTHONSTARTUP",
        "PYTHONPATH",
        "PYTHONHOME",
        "PERL5OPT",
        "PERL5LIB",
        "RUBYOPT",
        "NODE_OPTIONS",
        "BASH_ENV",
        "ENV",
    }
)
_RESERVED_ENV_PREFIX = "RECONCILER_"

_MAX_ARGS = 4096
_MAX_ARG_BYTES = 128 * 1024
_MAX_ENV = 1024
_MAX_TEXT = 4096
_MAX_AGENTS_PER_NODE = 10_000
_MAX_DURATION_S = 7 * 24 * 3600.0


class DesiredState(enum.StrEnum):
    """Whether the agent should be running."""

    RUNNING = "running"
    STOPPED = "stopped"


class RestartPolicy(enum.StrEnum):
    """When an exited agent is started again (the names Kubernetes uses)."""

    ALWAYS = "Always"
    ON_FAILURE = "OnFailure"
    NEVER = "Never"


@dataclass(frozen=True, slots=True)
class HeartbeatSpec:
    """Heartbeat liveness for an agent that sends heartbeats.

    Degraded after one missed ``interval_s``; restarted (per the restart policy)
    when no heartbeat arrived for ``timeout_s``.
    """

    interval_s: float = 5.0
    timeout_s: float = 15.0


@dataclass(frozen=True)
class AgentSpec:
    """The desired state of one agent on one node."""

    id: AgentId
    command: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    working_dir: str = ""
    version: str = ""
    state: DesiredState = DesiredState.RUNNING
    restart_policy: RestartPolicy = RestartPolicy.ALWAYS
    heartbeat: HeartbeatSpec | None = None
    stop_grace_period_s: float = 10.0
    config: Mapping[str, Any] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    user: str = ""

    def fingerprint(self) -> str:
        """A digest of every field whose change needs a restart (all but labels and state)."""
        return self._fingerprint

    @cached_property
    def _fingerprint(self) -> str:
        body = {
            "command": list(self.command),
            "env": dict(sorted(self.env.items())),
            "working_dir": self.working_dir,
            "version": self.version,
            "restart_policy": str(self.restart_policy),
            "heartbeat": None
            if self.heartbeat is None
            else [self.heartbeat.interval_s, self.heartbeat.timeout_s],
            "stop_grace_period_s": self.stop_grace_period_s,
            "config": self.config,
            "user": self.user,
        }
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class NodeDesiredState:
    """A node's whole desired state. Generations only grow."""

    generation: Generation
    agents: tuple[AgentSpec, ...] = ()

    def by_id(self) -> dict[AgentId, AgentSpec]:
        """The specs keyed by agent id."""
        return {spec.id: spec for spec in self.agents}


def validate_node_state(state: NodeDesiredState) -> None:
    """Check a whole node state; raise ``InvalidArgument`` naming the first bad field."""
    if state.generation < 0:
        raise InvalidArgument("generation", "must not be negative")
    if len(state.agents) > _MAX_AGENTS_PER_NODE:
        raise InvalidArgument("agents", f"at most {_MAX_AGENTS_PER_NODE} agents per node")
    seen: set[str] = set()
    for index, spec in enumerate(state.agents):
        validate_spec(spec, path=f"agents[{index}]")
        if spec.id in seen:
            raise InvalidArgument(f"agents[{index}].id", f"duplicate agent id {spec.id!r}")
        seen.add(spec.id)


def validate_spec(spec: AgentSpec, *, path: str = "agent") -> None:
    """Check one spec's shape; raise ``InvalidArgument`` naming the first bad field."""
    if not is_valid_agent_id(spec.id):
        raise InvalidArgument(
            f"{path}.id", f"{spec.id!r} is not a valid agent id (1-63 of A-Z a-z 0-9 . _ -)"
        )
    _validate_command(spec.command, path=f"{path}.command")
    _validate_env(spec.env, path=f"{path}.env")
    _validate_text(spec.working_dir, path=f"{path}.workingDir")
    if spec.working_dir and not spec.working_dir.startswith("/"):
        raise InvalidArgument(f"{path}.workingDir", "must be an absolute path")
    _validate_text(spec.version, path=f"{path}.version", limit=128)
    _validate_text(spec.user, path=f"{path}.user", limit=64)
    _validate_duration(spec.stop_grace_period_s, path=f"{path}.stopGracePeriodSeconds")
    if spec.heartbeat is not None:
        _validate_heartbeat(spec.heartbeat, path=f"{path}.heartbeat")
    for key, value in spec.labels.items():
        _validate_text(key, path=f"{path}.labels", limit=253)
        _validate_text(value, path=f"{path}.labels[{key}]", limit=253)
        if not key:
            raise InvalidArgument(f"{path}.labels", "label keys must not be empty")


def _validate_command(command: Sequence[str], *, path: str) -> None:
    if not command:
        raise InvalidArgument(path, "must not be empty (an argv list: [program, args...])")
    if len(command) > _MAX_ARGS:
        raise InvalidArgument(path, f"at most {_MAX_ARGS} arguments")
    if sum(len(arg) for arg in command) > _MAX_ARG_BYTES:
        raise InvalidArgument(path, f"at most {_MAX_ARG_BYTES} bytes of arguments")
    for index, arg in enumerate(command):
        if not isinstance(arg, str):
            raise InvalidArgument(f"{path}[{index}]", "must be a string")
        if "\x00" in arg:
            raise InvalidArgument(f"{path}[{index}]", "contains a NUL byte")
    program = command[0]
    if not program:
        raise InvalidArgument(f"{path}[0]", "the program must not be empty")
    if "/" in program and not program.startswith("/"):
        raise InvalidArgument(
            f"{path}[0]", f"{program!r} is a relative path; use an absolute path or a bare name"
        )


def _validate_env(env: Mapping[str, str], *, path: str) -> None:
    if len(env) > _MAX_ENV:
        raise InvalidArgument(path, f"at most {_MAX_ENV} variables")
    for name, value in env.items():
        if not name or "=" in name or "\x00" in name:
            raise InvalidArgument(f"{path}[{name!r}]", "is not a valid environment name")
        if name in FORBIDDEN_ENV_NAMES or name.startswith("LD_"):
            raise InvalidArgument(
                f"{path}[{name}]", "may not be set by a spec (it changes how code is loaded)"
            )
        if name.startswith(_RESERVED_ENV_PREFIX):
            raise InvalidArgument(f"{path}[{name}]", "RECONCILER_* names are set by the daemon")
        _validate_text(value, path=f"{path}[{name}]", limit=_MAX_ARG_BYTES)


def _validate_text(text: str, *, path: str, limit: int = _MAX_TEXT) -> None:
    if not isinstance(text, str):
        raise InvalidArgument(path, "must be a string")
    if "\x00" in text:
        raise InvalidArgument(path, "contains a NUL byte")
    if len(text) > limit:
        raise InvalidArgument(path, f"longer than {limit} characters")


def _validate_duration(value: float, *, path: str, minimum: float = 0.0) -> None:
    if not math.isfinite(value) or value < minimum or value > _MAX_DURATION_S:
        raise InvalidArgument(path, f"must be between {minimum} and {_MAX_DURATION_S} seconds")


def _validate_heartbeat(heartbeat: HeartbeatSpec, *, path: str) -> None:
    _validate_duration(heartbeat.interval_s, path=f"{path}.intervalSeconds", minimum=0.01)
    _validate_duration(heartbeat.timeout_s, path=f"{path}.timeoutSeconds", minimum=0.01)
    if heartbeat.timeout_s < heartbeat.interval_s:
        raise InvalidArgument(f"{path}.timeoutSeconds", "must not be shorter than the interval")
