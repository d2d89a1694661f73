"""The agent's settings, read from the environment the daemon sets at spawn.

What: one frozen ``AgentletConfig`` built by ``AgentletConfig.from_env()`` from the
``RECONCILER_*`` variables (and ``TRACEPARENT``, ``AGENTLET_HTTP_LISTEN``). Every value is
validated here; a bad one raises ``ConfigError`` naming the variable.

What not: no I/O besides reading the optional agent config file on request
(``load_agent_config``); no defaults for the daemon side (those live in the daemon).

Where next: ``agentlet.heartbeater`` sends heartbeats with these settings;
``agentlet.http_api`` listens on ``http_listen``; ``agentlet.agent`` wires both.

A process started without the variables runs standalone: ``heartbeats_enabled`` is
False and the caller logs that heartbeats are off.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "AGENT_ID_PATTERN",
    "DEFAULT_INTERVAL_S",
    "ENV_AGENT_ID",
    "ENV_CONFIG_FILE",
    "ENV_HTTP_LISTEN",
    "ENV_INTERVAL",
    "ENV_SOCKET",
    "ENV_TOKEN",
    "ENV_TRACEPARENT",
    "ENV_URL",
    "ENV_VERSION",
    "MAX_CONFIG_FILE_BYTES",
    "MAX_INTERVAL_S",
    "MIN_INTERVAL_S",
    "AgentletConfig",
    "ConfigError",
    "ListenAddress",
    "load_agent_config",
    "parse_interval",
    "parse_listen",
]

#: Same rule as ``reconciler.model.ids.AGENT_ID_PATTERN`` (agentlet may not import it).
AGENT_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
DEFAULT_INTERVAL_S = 5.0
MIN_INTERVAL_S = 0.01
MAX_INTERVAL_S = 86_400.0
MAX_VERSION_CHARS = 128
MAX_TOKEN_CHARS = 4096
#: sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
MAX_CONFIG_FILE_BYTES = 1024 * 1024
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")

ENV_AGENT_ID = "RECONCILER_AGENT_ID"
ENV_TOKEN = "RECONCILER_AGENT_TOKEN"  # noqa: S105 - a variable name, not a secret
ENV_SOCKET = "RECONCILER_HEARTBEAT_SOCKET"
ENV_URL = "RECONCILER_HEARTBEAT_URL"
ENV_INTERVAL = "RECONCILER_HEARTBEAT_INTERVAL_S"
ENV_VERSION = "RECONCILER_AGENT_VERSION"
ENV_CONFIG_FILE = "RECONCILER_AGENT_CONFIG_FILE"
ENV_TRACEPARENT = "TRACEPARENT"
ENV_HTTP_LISTEN = "AGENTLET_HTTP_LISTEN"


class ConfigError(ValueError):
    """A setting is missing or malformed; ``variable`` names it."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """Where agentlet's HTTP API listens (host is an IP literal or a name)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class AgentletConfig:
    """Everything agentlet needs; build it with ``from_env`` or directly in tests."""

    agent_id: str | None = None
    """The agent id; None when run standalone."""
    token: str | None = dataclasses.field(default=None, repr=False)
    """Per-agent secret: HTTP bearer token, socket fallback identity, /reload guard."""
    heartbeat_socket: str | None = None
    """Unix socket path of the daemon's receiver (preferred over the URL)."""
    heartbeat_url: str | None = None
    """HTTP endpoint of the daemon's receiver, e.g. http://127.0.0.1:7071/heartbeat."""
    interval_s: float = DEFAULT_INTERVAL_S
    """Seconds between heartbeats."""
    version: str = ""
    """The version the agent reports (the daemon's desired version by default)."""
    config_file: str | None = None
    """Path to a JSON file with the spec's ``config`` map."""
    traceparent: str | None = None
    """W3C trace context of the action that started the agent (invalid ones dropped)."""
    http_listen: ListenAddress | None = None
    """Where to serve /health, /reload and /metrics; None serves nothing."""

    @property
    def heartbeats_enabled(self) -> bool:
        """True when an agent id and a receiver (socket or URL) are known."""
        has_receiver = self.heartbeat_socket is not None or self.heartbeat_url is not None
        return self.agent_id is not None and has_receiver

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AgentletConfig:
        """Read and validate the agent environment; raise ``ConfigError`` on a bad value."""
        env = os.environ if environ is None else environ
        agent_id = _optional(env, ENV_AGENT_ID)
        token = _optional(env, ENV_TOKEN)
        socket_path = _optional(env, ENV_SOCKET)
        url = _optional(env, ENV_URL)
        config = cls(
            agent_id=None if agent_id is None else _check_agent_id(agent_id),
            token=None if token is None else _check_token(token),
            heartbeat_socket=None if socket_path is None else _check_socket(socket_path),
            heartbeat_url=None if url is None else _check_url(url),
            interval_s=_interval_from(env),
            version=_check_version(env.get(ENV_VERSION, "")),
            config_file=_optional(env, ENV_CONFIG_FILE),
            traceparent=_traceparent_from(env),
            http_listen=_listen_from(env),
        )
        _check_consistent(config)
        return config


def _optional(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "")
    return value if value != "" else None


def _check_agent_id(value: str) -> str:
    if AGENT_ID_PATTERN.fullmatch(value) is None:
        raise ConfigError(
            ENV_AGENT_ID, "must be 1-63 characters [A-Za-z0-9._-] starting with a letter or digit"
        )
    return value


def _check_token(value: str) -> str:
    if len(value) > MAX_TOKEN_CHARS or not value.isprintable() or value.strip() != value:
        raise ConfigError(ENV_TOKEN, "must be printable, without surrounding spaces, short")
    return value


def _check_socket(value: str) -> str:
    if value.startswith(("@", "\0")):
        raise ConfigError(ENV_SOCKET, "abstract sockets are not supported; give a path")
    if "\0" in value:
        raise ConfigError(ENV_SOCKET, "must not contain NUL")
    if len(os.fsencode(value)) > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(ENV_SOCKET, f"path longer than {MAX_SOCKET_PATH_BYTES} bytes")
    return value


def _check_url(value: str) -> str:
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(ENV_URL, f"not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(ENV_URL, "must be an http:// or https:// URL with a host")
    return value


def parse_interval(text: str, *, variable: str = ENV_INTERVAL) -> float:
    """Parse a heartbeat interval in seconds; raise ``ConfigError`` naming ``variable``."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(variable, f"not a number: {text!r}") from None
    if not math.isfinite(value) or not MIN_INTERVAL_S <= value <= MAX_INTERVAL_S:
        raise ConfigError(variable, f"must be between {MIN_INTERVAL_S} and {MAX_INTERVAL_S} s")
    return value


def _interval_from(env: Mapping[str, str]) -> float:
    text = _optional(env, ENV_INTERVAL)
    return DEFAULT_INTERVAL_S if text is None else parse_interval(text)


def _check_version(value: str) -> str:
    if len(value) > MAX_VERSION_CHARS or not value.isprintable():
        raise ConfigError(ENV_VERSION, f"must be printable and at most {MAX_VERSION_CHARS} chars")
    return value


def _traceparent_from(env: Mapping[str, str]) -> str | None:
    """A malformed trace context is dropped, as W3C Trace Context asks of receivers."""
    value = _optional(env, ENV_TRACEPARENT)
    if value is None or _TRACEPARENT.fullmatch(value.strip().lower()) is None:
        return None
    return value.strip().lower()


def parse_listen(text: str, *, variable: str = ENV_HTTP_LISTEN) -> ListenAddress:
    """Parse ``host:port``, ``[v6]:port``, ``:port`` or ``port`` (loopback when no host)."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65_535:
        raise ConfigError(variable, f"bad port in {text!r} (want host:port or a port)")
    if host == "":
        host = "127.0.0.1"
    elif not _is_host(host):
        raise ConfigError(variable, f"bad host in {text!r}")
    return ListenAddress(host=host, port=int(port_text))


def _is_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})", host) is not None
    return True


def _listen_from(env: Mapping[str, str]) -> ListenAddress | None:
    text = _optional(env, ENV_HTTP_LISTEN)
    return None if text is None else parse_listen(text)


def _check_consistent(config: AgentletConfig) -> None:
    has_receiver = config.heartbeat_socket is not None or config.heartbeat_url is not None
    if has_receiver and config.agent_id is None:
        raise ConfigError(ENV_AGENT_ID, "required when a heartbeat socket or URL is set")
    uses_http = config.heartbeat_socket is None and config.heartbeat_url is not None
    if uses_http and config.token is None:
        raise ConfigError(ENV_TOKEN, f"required for HTTP heartbeats to {ENV_URL}")


def load_agent_config(path: str) -> dict[str, Any]:
    """Read the spec's ``config`` map from ``path`` (a JSON object, at most 1 MiB)."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(ENV_CONFIG_FILE, f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_FILE_BYTES:
        raise ConfigError(ENV_CONFIG_FILE, f"{path} is larger than {MAX_CONFIG_FILE_BYTES} bytes")
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(ENV_CONFIG_FILE, f"{path} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(ENV_CONFIG_FILE, f"{path} must hold a JSON object")
    return value
