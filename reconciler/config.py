"""Settings for the daemon and the Manager: typed, grouped, frozen, validated once.

``DaemonSettings`` and ``ManagerSettings`` are trees of frozen dataclasses whose field
names are the YAML keys (``docs/configuration.md`` lists them all). Only this module
sees raw YAML: every other module receives a settings object whose values already
passed the type and sense checks below.

Loading goes defaults < file < environment < ``--set`` (and the CLI's named flags,
which it turns into ``--set`` texts). One generic walker applies each layer by
following the dataclass fields and their type hints:

- the file: refused if it is not a regular file or is over 1 MiB (stat, then a bounded
  read), and parsed by a ``SafeLoader`` that refuses anchors, aliases, unknown tags,
  duplicate keys and deep nesting while it composes, before anything is built, so an
  alias bomb costs microseconds;
- ``RECONCILER_<SECTION>__<FIELD>`` and ``RECONCILER_<FIELD>`` variables (others are
  ignored: the environment is shared);
- ``--set section.field=value`` texts.

Environment and ``--set`` values for string settings are taken verbatim (a DSN or a
path must not be bent by YAML's comment and colon rules); for every other setting
they are parsed as a safe YAML value and then type-checked like the file.

Errors: ``ConfigError`` is the only exception raised, always permanent (retrying
cannot help), naming where the value came from and the dotted key::

    ConfigError(origin, key, file)
      - the file cannot be read, is too large, or is not safe YAML   (key is None)
      - an unknown key, a wrong type, an out-of-range value          (key is set)

What this module does not do: open sockets or files named by settings, resolve the
node id from the host name, or read ``OTEL_*`` variables; the daemon and Manager
wiring do that with the values checked here.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import ipaddress
import math
import os
import re
import stat
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit, urlunsplit

from reconciler.logs import LogFormat, LogLevel
from reconciler.model.ids import is_valid_node_id
from reconciler.safeyaml import YamlRefused, kind_of, load_documents

__all__ = [
    "ENV_PREFIX",
    "MAX_DURATION_S",
    "MAX_FILE_BYTES",
    "MAX_INTEGER",
    "REDACTED",
    "AgentsSettings",
    "BackoffSettings",
    "ConfigError",
    "DaemonGrpcSettings",
    "DaemonSettings",
    "HeartbeatSettings",
    "LoggingSettings",
    "ManagerGrpcSettings",
    "ManagerLinkSettings",
    "ManagerSettings",
    "MetricsSettings",
    "MonitorSettings",
    "NodeSettings",
    "NodesSettings",
    "PushSettings",
    "RetentionSettings",
    "Role",
    "StoreBackend",
    "StoreSettings",
    "TelemetryExporter",
    "TelemetrySettings",
    "TlsMode",
    "TlsSettings",
    "env_names",
    "infer_role",
    "is_loopback_host",
    "load_daemon_settings",
    "load_manager_settings",
    "load_settings",
    "parse_advertised",
    "parse_host_port",
    "read_settings_file",
    "redact_dsn",
    "settings_to_dict",
]

#: Settings files larger than this are refused before they are parsed (1 MiB).
MAX_FILE_BYTES: Final = 1024 * 1024
#: Upper bound for every duration setting: one year, in seconds.
MAX_DURATION_S: Final = 365 * 24 * 3600.0
#: Upper bound for every integer setting (gRPC takes these as C ints).
MAX_INTEGER: Final = 2**31 - 1
#: Prefix of the environment variables that override settings.
ENV_PREFIX: Final = "RECONCILER_"
#: YAML nesting deeper than this is refused (settings need three levels).
_MAX_NESTING: Final = 16

S = TypeVar("S", "DaemonSettings", "ManagerSettings")


class ConfigError(Exception):
    """A settings problem; ``file`` is the settings file (when one is to blame) and
    ``key`` the dotted setting (when one is known). Permanent: fix the input."""

    def __init__(
        self, problem: str, *, origin: str, key: str | None = None, file: str | None = None
    ) -> None:
        self.problem = problem
        self.origin = origin
        self.key = key
        self.file = file
        where = f"{origin}: {key}" if key else origin
        super().__init__(f"{where}: {problem}")


class Role(enum.StrEnum):
    """Which process a settings file is for."""

    DAEMON = "daemon"
    MANAGER = "manager"


class TlsMode(enum.StrEnum):
    """Transport security between Manager and daemons."""

    INSECURE = "insecure"
    MTLS = "mtls"


class StoreBackend(enum.StrEnum):
    """Where the Manager keeps its state."""

    SQLITE = "sqlite"
    POSTGRES = "postgres"


class TelemetryExporter(enum.StrEnum):
    """Where OpenTelemetry spans go."""

    NONE = "none"
    OTLP = "otlp"
    CONSOLE = "console"


def _bounded(default: Any, *, minimum: float | None = None, maximum: float | None = None) -> Any:
    """A field whose number range differs from the usual (ints >= 1, durations > 0)."""
    return field(default=default, metadata={"minimum": minimum, "maximum": maximum})


def _secret(default: str) -> Any:
    """A field whose value is redacted when settings are printed."""
    return field(default=default, metadata={"secret": True})


# ---------------------------------------------------------------------------- sections


@dataclass(frozen=True, slots=True)
class NodeSettings:
    """Who this node is (daemon)."""

    id: str = ""
    """The node id sent at registration and shown everywhere. Default "": the daemon
    uses the host name, which is right for one daemon per host."""
    labels: Mapping[str, str] = field(default_factory=lambda: types.MappingProxyType({}))
    """Labels (string to string) sent at registration; AgentSets select nodes by them.
    Default: none."""


@dataclass(frozen=True, slots=True)
class DaemonGrpcSettings:
    """How the daemon serves DaemonService."""

    listen: str = "127.0.0.1:7070"
    """host:port for DaemonService. Default 127.0.0.1:7070 (loopback, so the default is
    safe without TLS). "" disables TCP."""
    unix_socket: str = ""
    """An extra Unix socket path serving DaemonService, for local tools and sidecars.
    Default "": none."""
    advertise_address: str = ""
    """The address the Manager dials to reach this daemon: host:port, [v6]:port, or a
    bare host or address that takes the port of ``listen``. Set it when the Manager
    cannot reach the listen address (a pod IP, NAT, a proxy). Default "": the listen
    address, or this host's name and the listen port when listening on every
    interface."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest gRPC message accepted or sent, in bytes. Default 4194304 (4 MiB, gRPC's
    own default), enough for thousands of agent specs."""
    max_concurrent_rpcs: int = 100
    """RPCs served at once; more wait. Default 100: a daemon has few clients."""


@dataclass(frozen=True, slots=True)
class ManagerGrpcSettings:
    """How the Manager serves ManagerService and FleetService."""

    listen: str = "127.0.0.1:7060"
    """host:port for ManagerService and FleetService; must not be empty. Default
    127.0.0.1:7060 (loopback, so the default is safe without TLS)."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest gRPC message accepted or sent, in bytes. Default 4194304 (4 MiB)."""
    max_concurrent_rpcs: int = 1000
    """RPCs served at once; more wait. Default 1000: every daemon of the fleet calls."""


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """Mutual TLS between Manager and daemons (and the CLI)."""

    mode: TlsMode = TlsMode.INSECURE
    """insecure | mtls. Default insecure, for development: the gRPC listener must then
    be a loopback address and the process warns at start. mtls needs the three files."""
    ca_file: str = ""
    """PEM file of the CA that signs peers' certificates. Default "": none."""
    cert_file: str = ""
    """PEM certificate chain of this process. Default "": none."""
    key_file: str = ""
    """PEM private key of ``cert_file`` (keep it 0600). Default "": none."""


@dataclass(frozen=True, slots=True)
class ManagerLinkSettings:
    """How the daemon talks to its Manager."""

    address: str = ""
    """host:port of the Manager. Default "": a standalone node, driven only through
    its own DaemonService."""
    heartbeat_interval_s: float = 10.0
    """Seconds between node heartbeats to the Manager. Default 10.0; the Manager marks
    a node NotReady after ``nodes.not_ready_after_s`` (45 s) without one."""
    report_interval_s: float = 15.0
    """Seconds between observed-state and metrics reports. Default 15.0."""
    call_timeout_s: float = 5.0
    """Deadline of each call to the Manager, in seconds. Default 5.0, so a stuck
    Manager never stalls the node."""


@dataclass(frozen=True, slots=True)
class HeartbeatSettings:
    """The daemon's receivers of agent heartbeats."""

    socket_path: str = "/run/reconciler/heartbeat.sock"
    """Unix socket for JSON-lines heartbeats (peer credentials are checked). Default
    /run/reconciler/heartbeat.sock; "" disables it."""
    http_listen: str = "127.0.0.1:7071"
    """host:port for ``POST /heartbeat`` (bearer token per agent). Default
    127.0.0.1:7071; "" disables it."""
    max_frame_bytes: int = 65536
    """Largest heartbeat line or HTTP body, in bytes. Default 65536: a heartbeat is a
    few hundred bytes; anything larger is refused."""
    max_connections: int = 4096
    """Open heartbeat connections at most (socket and HTTP). Default 4096."""
    idle_timeout_s: float = 60.0
    """Seconds a connection may stay silent before it is closed. Default 60.0."""
    http_queue_size: int = 10000
    """Heartbeats queued for processing before HTTP answers 429. Default 10000."""
    http_workers: int = 4
    """Tasks that drain the HTTP heartbeat queue. Default 4."""
    allow_unmanaged: bool = False
    """Record heartbeats from unknown agent ids as unmanaged agents instead of refusing
    them. Default false: only agents the daemon started may report."""


@dataclass(frozen=True, slots=True)
class AgentsSettings:
    """What the daemon may run, and where agent output goes."""

    allowed_commands: tuple[str, ...] = ()
    """fnmatch patterns on the resolved absolute path of argv[0]; nothing remote can
    widen them. Default empty: nothing may run (the daemon says so at start)."""
    allow_root: bool = False
    """May an agent whose spec sets ``user: root`` run as uid 0. Default false."""
    log_dir: str = ""
    """Directory of agents' stdout/stderr files. Default "": <state_dir>/logs."""
    log_max_bytes: int = 10 * 1024 * 1024
    """Size at which an agent's log file is rotated, in bytes. Default 10485760 (10 MiB)."""
    log_backups: int = _bounded(3, minimum=0)
    """Rotated log files kept per agent (0 keeps none). Default 3."""
    failure_output: bool = True
    """On a failed exit, add the last line the agent printed to its status message and
    exit event ("exited with code 2: error: ..."), which the Manager stores and shows.
    Default true; false keeps agent output on the node."""
    stop_agents_on_exit: bool = False
    """Stop every agent when the daemon exits. Default false: agents keep running and
    a restarted daemon adopts them, so a daemon upgrade costs the agents nothing."""


@dataclass(frozen=True, slots=True)
class BackoffSettings:
    """How crash loops slow down (the policy ``reconciler.reconcile`` applies)."""

    initial_s: float = 1.0
    """Delay before the second restart in a row, in seconds (the first is immediate).
    Default 1.0. Must not exceed ``max_s``."""
    max_s: float = 60.0
    """Cap of the doubling delay, in seconds. Default 60.0."""
    reset_after_s: float = 600.0
    """Seconds an agent must stay healthy before its backoff resets. Default 600.0."""
    burst_starts: int = 5
    """Starts allowed within ``burst_window_s`` before backoff applies. Default 5."""
    burst_window_s: float = 10.0
    """Window counting ``burst_starts``, in seconds. Default 10.0."""


@dataclass(frozen=True, slots=True)
class MonitorSettings:
    """Resource sampling of agent processes (psutil)."""

    interval_s: float = 5.0
    """Seconds between samples of every agent's CPU and memory. Default 5.0 (a sweep of
    1,000 agents costs about 70 ms, off the event loop)."""
    retention_s: float = 3600.0
    """Seconds of samples kept for GetAgentMetrics; at least ``interval_s``. Default
    3600.0 (one hour). A sample costs 24 bytes per agent: one hour at 5 s is 17 KiB
    per agent, 17 MiB for 1,000 agents."""


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """The Prometheus endpoint."""

    listen: str = "127.0.0.1:9470"
    """host:port serving ``/metrics``; "" disables it. Default 127.0.0.1:9470 for the
    daemon and 127.0.0.1:9460 for the Manager."""


@dataclass(frozen=True, slots=True)
class LoggingSettings:
    """Log output (``reconciler.logs``); the CLI's --log-format/--log-level win."""

    format: LogFormat = LogFormat.TEXT
    """text | json. Default text; use json where a collector reads the logs."""
    level: LogLevel = LogLevel.INFO
    """debug | info | warning | error. Default info."""


@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    """OpenTelemetry tracing export (OTEL_* environment variables are honoured too)."""

    exporter: TelemetryExporter = TelemetryExporter.NONE
    """none | otlp | console. Default none: tracing costs nothing unless asked for."""
    otlp_endpoint: str = ""
    """http(s) URL of the OTLP gRPC collector, e.g. http://127.0.0.1:4317. Default "":
    OTEL_EXPORTER_OTLP_ENDPOINT or the exporter's own default."""


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """The Manager's database."""

    backend: StoreBackend = StoreBackend.SQLITE
    """sqlite | postgres. Default sqlite (nothing to install); postgres lets several
    Manager replicas share one database."""
    sqlite_path: str = ""
    """SQLite database file. Default "": <state_dir>/manager.db."""
    postgres_dsn: str = _secret("")
    """libpq DSN or URL; required when backend is postgres. Secret: redacted when
    printed; prefer RECONCILER_STORE__POSTGRES_DSN over the file. Default ""."""
    pool_size: int = 10
    """Database connections kept open. Default 10."""


@dataclass(frozen=True, slots=True)
class NodesSettings:
    """How the Manager judges nodes."""

    not_ready_after_s: float = 45.0
    """Seconds without a node heartbeat before the node is NotReady. Default 45.0
    (more than four missed heartbeats at the daemon's default 10 s)."""


@dataclass(frozen=True, slots=True)
class PushSettings:
    """How the Manager pushes desired state to daemons."""

    concurrency: int = 64
    """Pushes in flight at once across the fleet. Default 64."""
    timeout_s: float = 5.0
    """Deadline of one push, in seconds. Default 5.0."""
    max_attempts: int = 5
    """Attempts per push before giving up; the daemon still converges by pulling when
    a heartbeat answer shows it is behind. Default 5."""


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    """What the Manager keeps for operators."""

    metrics_window_s: float = 3600.0
    """Seconds of reported agent metrics kept. Default 3600.0 (one hour)."""
    events_max: int = 10000
    """Events kept (oldest dropped first). Default 10000."""


# ------------------------------------------------------------------------------- roots


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    """Everything a daemon is told by its settings file, environment and flags."""

    node: NodeSettings = field(default_factory=NodeSettings)
    state_dir: str = "/var/lib/reconciler"
    """Directory of the desired state, adopted pids and agent logs (created 0700); one
    daemon at a time may run from it.
    Default /var/lib/reconciler."""
    grpc: DaemonGrpcSettings = field(default_factory=DaemonGrpcSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    manager: ManagerLinkSettings = field(default_factory=ManagerLinkSettings)
    heartbeat: HeartbeatSettings = field(default_factory=HeartbeatSettings)
    agents: AgentsSettings = field(default_factory=AgentsSettings)
    backoff: BackoffSettings = field(default_factory=BackoffSettings)
    monitor: MonitorSettings = field(default_factory=MonitorSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)


@dataclass(frozen=True, slots=True)
class ManagerSettings:
    """Everything a Manager is told by its settings file, environment and flags."""

    state_dir: str = "/var/lib/reconciler-manager"
    """Directory of the SQLite database and other Manager files. Default
    /var/lib/reconciler-manager."""
    grpc: ManagerGrpcSettings = field(default_factory=ManagerGrpcSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    nodes: NodesSettings = field(default_factory=NodesSettings)
    push: PushSettings = field(default_factory=PushSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    metrics: MetricsSettings = field(
        default_factory=lambda: MetricsSettings(listen="127.0.0.1:9460")
    )
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)


_ROLE_CLASSES: Final[Mapping[Role, type[DaemonSettings] | type[ManagerSettings]]] = {
    Role.DAEMON: DaemonSettings,
    Role.MANAGER: ManagerSettings,
}

#: Top-level keys that only a Manager settings file has.
_MANAGER_ONLY_KEYS: Final = frozenset({"store", "nodes", "push", "retention"})


# ------------------------------------------------------------------------ safe YAML


def _parse_yaml(text: str, *, origin: str, file: str | None) -> Any:
    """One safe YAML document from ``text``; a ConfigError for anything else."""
    try:
        documents = load_documents(text, max_nesting=_MAX_NESTING, standard_tags=True)
    except YamlRefused as exc:
        raise ConfigError(str(exc), origin=origin, file=file) from None
    if len(documents) > 1:
        raise ConfigError(
            "not valid YAML: expected a single document in the stream", origin=origin, file=file
        )
    return documents[0] if documents else None


def _read_bounded(path: str) -> bytes:
    """The file's bytes; refuses symbolic links, non-regular files, files others may
    write, and files over MAX_FILE_BYTES."""
    too_large = f"larger than {MAX_FILE_BYTES} bytes (1 MiB), the limit for settings files"
    try:
        # No following a link, and no blocking on a FIFO: the checks below see the file.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(_open_problem(path, exc), origin=path, file=path) from None
    try:
        info = os.fstat(fd)
        problem = _unsafe_file_problem(info, path)
        if problem is not None:
            raise ConfigError(problem, origin=path, file=path)
        if info.st_size > MAX_FILE_BYTES:
            raise ConfigError(too_large, origin=path, file=path)
        with open(fd, "rb", closefd=False) as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", origin=path, file=path) from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(too_large, origin=path, file=path)
    return data


def _open_problem(path: str, error: OSError) -> str:
    if error.errno == errno.ELOOP and os.path.islink(path):
        return "is a symbolic link; refusing to follow it (give the path of the file itself)"
    return f"cannot read: {error.strerror}"


def _unsafe_file_problem(info: os.stat_result, path: str) -> str | None:
    """Why a settings file must not be used, or None: anyone who may write it could
    choose what the process runs and whom it trusts."""
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        mode = stat.S_IMODE(info.st_mode)
        return f"is writable by group or others (mode {mode:04o}); run chmod go-w {path}"
    return None


def read_settings_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The top-level mapping of a settings file, read and parsed safely (see module
    note); an empty file is an empty mapping. Raises ConfigError."""
    name = os.fspath(path)
    try:
        text = _read_bounded(name).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte {exc.start})", origin=name, file=name) from None
    document = _parse_yaml(text, origin=name, file=name)
    if document is None:
        return {}
    if not isinstance(document, dict):
        problem = f"the top level must be a mapping of settings, not {kind_of(document)}"
        raise ConfigError(problem, origin=name, file=name)
    return document


def infer_role(path: str | os.PathLike[str]) -> Role:
    """``manager`` when the file has a top-level store, nodes, push or retention key,
    else ``daemon``. Raises ConfigError when the file cannot be read safely."""
    keys = read_settings_file(path).keys()
    return Role.MANAGER if _MANAGER_ONLY_KEYS.intersection(keys) else Role.DAEMON


# ------------------------------------------------------------------------ type checks


@dataclass(frozen=True, slots=True)
class _Origin:
    """Where a layer's values come from, for error messages."""

    label: str
    file: str | None = None

    def error(self, key: str | None, problem: str) -> ConfigError:
        return ConfigError(problem, origin=self.label, key=key, file=self.file)


_DEFAULTS: Final = _Origin("default settings")


def _expected(tp: Any) -> str:
    """What a field type accepts, in words."""
    if _is_enum(tp):
        return "one of " + ", ".join(member.value for member in tp)
    words = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    if tp in words:
        return words[tp]
    if typing.get_origin(tp) is tuple:
        return "a list of strings"
    return "a mapping of strings to strings"


def _is_enum(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, enum.StrEnum)


def _scalar_ok(tp: Any, value: object) -> bool:
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _convert(tp: Any, value: object, key: str, origin: _Origin) -> object:
    """``value`` as the field type ``tp``, or a ConfigError naming ``key``."""
    wrong = origin.error(key, f"expected {_expected(tp)}, got {kind_of(value)}")
    if _is_enum(tp):
        if not isinstance(value, str) or value not in {m.value for m in tp}:
            raise wrong
        return tp(value)
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, list):
            raise wrong
        return tuple(_convert(str, item, f"{key}[{i}]", origin) for i, item in enumerate(value))
    if typing.get_origin(tp) is Mapping:
        return _convert_mapping(value, key, origin, wrong)
    if not _scalar_ok(tp, value):
        raise wrong
    if isinstance(value, float | int) and tp is float:
        if not math.isfinite(value):
            raise origin.error(key, f"expected a finite number, got {value}")
        return float(value)
    return value


def _convert_mapping(value: object, key: str, origin: _Origin, wrong: ConfigError) -> object:
    if not isinstance(value, dict):
        raise wrong
    for item_key, item in value.items():
        if not isinstance(item_key, str):
            raise origin.error(key, f"keys must be strings, got {kind_of(item_key)}")
        _convert(str, item, f"{key}.{item_key}", origin)
    return types.MappingProxyType(dict(value))


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """Field name -> resolved type of a settings dataclass (cached)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


def _unknown_key(cls: type, key: object, path: str, origin: _Origin) -> ConfigError:
    dotted = f"{path}.{key}" if path else str(key)
    known = ", ".join(f.name for f in dataclasses.fields(cls))
    return origin.error(dotted, f"unknown setting (known here: {known})")


def _apply(
    current: Any, raw: object, *, path: str, origin: _Origin, seen: dict[str, _Origin]
) -> Any:
    """``current`` with the values of the mapping ``raw`` type-checked and applied."""
    if raw is None:  # an empty section (every key commented out) keeps what it had
        return current
    if not isinstance(raw, dict):
        raise origin.error(path or None, f"expected a mapping of settings, got {kind_of(raw)}")
    hints = _hints(type(current))
    changes: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or key not in hints:
            raise _unknown_key(type(current), key, path, origin)
        dotted = f"{path}.{key}" if path else key
        if _is_section(hints[key]):
            changes[key] = _apply(
                getattr(current, key), value, path=dotted, origin=origin, seen=seen
            )
        else:
            changes[key] = _convert(hints[key], value, dotted, origin)
            seen[dotted] = origin
    return dataclasses.replace(current, **changes)


# --------------------------------------------------------------- environment and --set


def env_names(cls: type[DaemonSettings] | type[ManagerSettings]) -> dict[str, str]:
    """Environment variable name -> dotted setting, for every setting of ``cls``."""
    names: dict[str, str] = {}
    for name, tp in _hints(cls).items():
        if _is_section(tp):
            for sub in _hints(tp):
                names[f"{ENV_PREFIX}{name.upper()}__{sub.upper()}"] = f"{name}.{sub}"
        else:
            names[f"{ENV_PREFIX}{name.upper()}"] = name
    return names


def _resolve(cls: type, dotted: str, origin: _Origin) -> tuple[list[str], Any]:
    """The field path and type a dotted key names (a last part may key a mapping)."""
    parts = dotted.split(".")
    current: Any = cls
    for index, part in enumerate(parts):
        hints = _hints(current)
        if part not in hints:
            raise _unknown_key(current, part, ".".join(parts[:index]), origin)
        current = hints[part]
        if typing.get_origin(current) is Mapping and index == len(parts) - 2:
            return parts, str
        if not _is_section(current):
            if index != len(parts) - 1:
                raise origin.error(dotted, f"{'.'.join(parts[: index + 1])} is not a section")
            return parts, current
    raise origin.error(dotted, "names a section, not a setting")


def _parse_text(tp: Any, text: str, key: str, origin: _Origin) -> object:
    """A string setting takes ``text`` verbatim; others parse it as safe YAML."""
    if tp is str:
        return text
    if len(text) > MAX_FILE_BYTES:
        raise origin.error(key, "value too long")
    return _parse_yaml(text, origin=f"{origin.label} ({key})", file=None)


def _nest(parts: list[str], value: object) -> dict[str, Any]:
    raw: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        raw = {part: raw}
    return raw


def _apply_text(
    current: S, dotted: str, text: str, *, origin: _Origin, seen: dict[str, _Origin]
) -> S:
    """``current`` with one dotted setting set from a text (environment or --set)."""
    parts, tp = _resolve(type(current), dotted, origin)
    value = _parse_text(tp, text, dotted, origin)
    holder: Any = current
    for part in parts[:-1]:
        holder = getattr(holder, part)
    if isinstance(holder, Mapping):  # section.mapping.key: add to the mapping
        value = {**holder, parts[-1]: _convert(str, value, dotted, origin)}
        parts = parts[:-1]
    return typing.cast(S, _apply(current, _nest(parts, value), path="", origin=origin, seen=seen))


def _split_override(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise ConfigError("expected section.field=value", origin="--set")
    return key.strip(), value


# --------------------------------------------------------------------- sense checks


_LABEL: Final = r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?"
_HOST_NAME: Final = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")


def parse_host_port(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` as (host, port); ValueError saying what is wrong."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(f"expected [address]:port, got {text!r}")
        port_text = rest[1:]
        if not _is_ipv6(host):
            raise ValueError(f"only an IPv6 address goes in [address]:port, got {text!r}")
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or not host:
            raise ValueError(f"expected host:port, got {text!r}")
        if ":" in host:
            raise ValueError(f"write an IPv6 address as [address]:port, got {text!r}")
        if not _HOST_NAME.fullmatch(host):
            raise ValueError(f"{host!r} is not a host name or address")
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"port must be a number from 0 to 65535, got {port_text!r}")
    return host, int(port_text)


def parse_advertised(text: str, *, default_port: int | None) -> tuple[str, int]:
    """An advertised address as (host, port): ``host:port``, ``[v6]:port``, or a bare
    host name, IPv4 or IPv6 address, which takes ``default_port``. ValueError saying
    what is wrong (a bare host when there is no default port, say)."""
    try:
        return parse_host_port(text)
    except ValueError as error:
        if text.startswith("[") or (":" in text and not _is_ipv6(text)):
            raise error from None
    if not (_is_ipv6(text) or _HOST_NAME.fullmatch(text)):
        raise ValueError(f"{text!r} is not a host, address, host:port or [address]:port")
    if default_port is None:
        raise ValueError(f"{text!r} has no port, and there is no listen port to use")
    return text, default_port


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _number_problems(section: Any, path: str) -> Iterator[tuple[str, str]]:
    """Ints must be 1..MAX_INTEGER and durations in (0, MAX_DURATION_S], unless a
    field's metadata says otherwise."""
    for f in dataclasses.fields(section):
        value, tp = getattr(section, f.name), _hints(type(section))[f.name]
        dotted = f"{path}.{f.name}" if path else f.name
        if _is_section(tp):
            yield from _number_problems(value, dotted)
        elif tp in (int, float) and not isinstance(value, bool):
            yield from _range_problem(dotted, value, tp, f.metadata)


def _range_problem(
    key: str, value: float, tp: type, metadata: Mapping[str, Any]
) -> Iterator[tuple[str, str]]:
    floor = metadata.get("minimum")
    ceiling = metadata.get("maximum") or (MAX_INTEGER if tp is int else MAX_DURATION_S)
    if tp is float and floor is None:
        if not value > 0:
            yield key, f"must be greater than 0, got {value}"
            return
    elif value < (1 if floor is None else floor):
        yield key, f"must be at least {1 if floor is None else floor}, got {value}"
        return
    if value > ceiling:
        yield key, f"must be at most {ceiling}, got {value}"


def _address_problems(key: str, text: str) -> Iterator[tuple[str, str]]:
    if text:
        try:
            parse_host_port(text)
        except ValueError as exc:
            yield key, str(exc)


def _tls_problems(tls: TlsSettings, listen: str) -> Iterator[tuple[str, str]]:
    if tls.mode is TlsMode.MTLS:
        missing = [f"tls.{n}" for n in ("ca_file", "cert_file", "key_file") if not getattr(tls, n)]
        if missing:
            yield "tls.mode", f"mtls needs {', '.join(missing)}"
    elif listen and not any(_address_problems("", listen)):
        host, _ = parse_host_port(listen)
        if not is_loopback_host(host):
            problem = (
                f"{host} is not a loopback address; with tls.mode insecure the server "
                "listens on loopback only (use tls.mode mtls)"
            )
            yield "grpc.listen", problem


def _common_problems(s: DaemonSettings | ManagerSettings) -> Iterator[tuple[str, str]]:
    yield from _number_problems(s, "")
    if not s.state_dir:
        yield "state_dir", "must not be empty"
    yield from _address_problems("grpc.listen", s.grpc.listen)
    yield from _tls_problems(s.tls, s.grpc.listen)
    yield from _address_problems("metrics.listen", s.metrics.listen)
    endpoint = s.telemetry.otlp_endpoint
    if endpoint and (
        urlsplit(endpoint).scheme not in ("http", "https") or not urlsplit(endpoint).netloc
    ):
        yield "telemetry.otlp_endpoint", f"expected an http(s) URL, got {endpoint!r}"


def _daemon_problems(s: DaemonSettings) -> Iterator[tuple[str, str]]:
    yield from _common_problems(s)
    if s.node.id and not is_valid_node_id(s.node.id):
        yield "node.id", f"{s.node.id!r} is not a valid node id (letters, digits, '.', '_', '-')"
    if "" in s.node.labels:
        yield "node.labels", "label keys must not be empty"
    yield from _address_problems("manager.address", s.manager.address)
    yield from _address_problems("heartbeat.http_listen", s.heartbeat.http_listen)
    if s.grpc.advertise_address:
        try:
            parse_advertised(s.grpc.advertise_address, default_port=1 if s.grpc.listen else None)
        except ValueError as error:
            yield "grpc.advertise_address", str(error)
    for index, pattern in enumerate(s.agents.allowed_commands):
        if not pattern.startswith("/"):
            yield (
                f"agents.allowed_commands[{index}]",
                f"{pattern!r} must be an absolute path pattern",
            )
    if s.backoff.initial_s > s.backoff.max_s:
        yield (
            "backoff.initial_s",
            f"{s.backoff.initial_s} is greater than backoff.max_s ({s.backoff.max_s})",
        )
    if s.monitor.retention_s < s.monitor.interval_s:
        yield (
            "monitor.retention_s",
            f"{s.monitor.retention_s} is less than monitor.interval_s ({s.monitor.interval_s})",
        )


def _manager_problems(s: ManagerSettings) -> Iterator[tuple[str, str]]:
    yield from _common_problems(s)
    if not s.grpc.listen:
        yield "grpc.listen", "must not be empty: it is how daemons and operators reach the Manager"
    if s.store.backend is StoreBackend.POSTGRES and not s.store.postgres_dsn:
        yield "store.backend", "postgres needs store.postgres_dsn"


def _check(
    settings: DaemonSettings | ManagerSettings,
    seen: Mapping[str, _Origin],
    *,
    fallback: _Origin,
) -> None:
    """Raise for the first problem, naming where the offending value came from (or
    ``fallback`` when it is a default that only the other values made wrong)."""
    if isinstance(settings, DaemonSettings):
        problems = _daemon_problems(settings)
    else:
        problems = _manager_problems(settings)
    for key, problem in problems:
        raise seen.get(key.split("[")[0], fallback).error(key, problem)


# ------------------------------------------------------------------------------ loading


def load_settings(
    cls: type[S],
    path: str | os.PathLike[str] | None,
    *,
    env: Mapping[str, str] = os.environ,
    overrides: Sequence[str] = (),
) -> S:
    """Defaults < the file at ``path`` < ``env`` < ``overrides`` (``a.b=value`` texts),
    type-checked and sense-checked. Raises ConfigError naming the origin and key."""
    settings = cls()
    seen: dict[str, _Origin] = {}
    fallback = _DEFAULTS
    if path is not None:
        name = os.fspath(path)
        fallback = _Origin(name, name)
        document = read_settings_file(name)
        settings = _apply(settings, document, path="", origin=fallback, seen=seen)
    for variable, dotted in env_names(cls).items():
        if variable in env:
            origin = _Origin(f"environment variable {variable}")
            settings = _apply_text(settings, dotted, env[variable], origin=origin, seen=seen)
    for text in overrides:
        dotted, value = _split_override(text)
        # The label leaves the value out: it may be a secret such as a DSN.
        settings = _apply_text(settings, dotted, value, origin=_Origin("--set"), seen=seen)
    _check(settings, seen, fallback=fallback)
    return settings


def load_daemon_settings(
    path: str | os.PathLike[str] | None,
    *,
    env: Mapping[str, str] = os.environ,
    overrides: Sequence[str] = (),
) -> DaemonSettings:
    """The daemon's settings; see ``load_settings``."""
    return load_settings(DaemonSettings, path, env=env, overrides=overrides)


def load_manager_settings(
    path: str | os.PathLike[str] | None,
    *,
    env: Mapping[str, str] = os.environ,
    overrides: Sequence[str] = (),
) -> ManagerSettings:
    """The Manager's settings; see ``load_settings``."""
    return load_settings(ManagerSettings, path, env=env, overrides=overrides)


# ---------------------------------------------------------------------------- printing


_DSN_PASSWORD: Final = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", re.IGNORECASE)
REDACTED: Final = "***"


def redact_dsn(dsn: str) -> str:
    """``dsn`` with any password replaced by ``***`` (URL and key=value forms)."""
    parts = urlsplit(dsn)
    if parts.scheme and parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        user = parts.username or ""
        parts = parts._replace(netloc=f"{user}:{REDACTED}@{host}")
        dsn = urlunsplit(parts)
    return _DSN_PASSWORD.sub(lambda m: f"{m.group(1)}{REDACTED}", dsn)


def _plain(value: Any, *, secret: bool, redact: bool) -> Any:
    if _is_section(type(value)):
        return settings_to_dict(value, redact=redact)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return redact_dsn(value) if secret and redact and isinstance(value, str) else value


def settings_to_dict(settings: Any, *, redact: bool = True) -> dict[str, Any]:
    """Settings as plain YAML/JSON-ready data, secrets redacted unless told not to."""
    return {
        f.name: _plain(
            getattr(settings, f.name), secret=bool(f.metadata.get("secret")), redact=redact
        )
        for f in dataclasses.fields(settings)
    }
