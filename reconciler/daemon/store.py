"""The daemon's state directory: desired state, overrides, adopted pids, operation ids.

One directory (0700, owned by the daemon's user) holds six small JSON files, each
written by one durable-write helper (``write_durably``: temp file 0600 in the same
directory, write, fsync, rename over the old file, fsync the directory), so a reader
after any crash sees the whole old file or the whole new one::

    desired.json      the node's NodeDesiredState (generation + AgentSpecs)
    overrides.json    agent id -> operator's local start/stop and the generation it was set at
    patches.json      the generation, and agent id -> the spec a PushUpdate rolled it to
    processes.json    agent id -> pid, start ticks, command line, fingerprint, heartbeat
                      token (what adoption after a daemon restart needs)
    finished.json     agent id -> the spec fingerprint and exit of an agent that ended for
                      good under its restart policy (so a restart does not run it again)
    operations.json   the last 1,024 OperateAgent operation ids and their results

and ``daemon.lock``, which the running daemon holds (``StateDirLock``): one daemon per
state directory.

Every file is ``{"schema_version": 1, "kind": ..., "checksum": "sha256:...", "body": ...}``
with the checksum taken over the canonical JSON of ``body``. A file that is truncated,
fails its checksum, has an unknown schema version, does not decode, is not a regular
file, or is writable by others is moved aside to ``<name>.corrupt-<UTC timestamp>``,
logged, and reported (``LoadResult.corrupt``, ``DesiredStateStore.corrupt_files``);
loading never raises for what a file contains, so a bad file cannot crash-loop the
daemon. The desired state then starts empty at generation 0 and the Manager's next
push or pull fills it.

``processes.json`` is written on every start and exit, so by default it skips the
fsyncs and keeps only the atomic rename: its records matter only while agent processes
survive, i.e. when the kernel did not crash, and then the page cache survived too. A
SIGKILLed daemon still reads the whole old or new file. ``tests/unit/test_store.py``
prints both costs; measured here with 1,000 agents (186 KB): 2.5 ms per save without
fsync, 3.8 ms with (this machine's disk acknowledges fsync fast; real disks take
milliseconds more). ``sync_processes=True`` turns the fsyncs on. ``finished.json`` is
written the same way: its entries carry the boot id and count only within that boot
(after a reboot every agent starts again, as a oneshot service runs again at boot).

Every method does blocking file I/O (an fsync can take tens of milliseconds on a busy
disk): call them from ``asyncio.to_thread``, one writer at a time, never on the loop.

What this module does not do: decide whether a generation is accepted (the controller
does, with ``check_generation``), validate commands against the allow-list
(``reconciler.daemon.commands``), or hold observed state (the controller's records).
``StateStore`` is the Protocol the controller depends on; ``MemoryStore`` is its fake.

Failpoints (see ``reconciler.failpoints``): ``store.before_write``,
``store.after_tmp_write``, ``store.after_tmp_fsync``, ``store.after_rename``,
``store.after_dir_fsync`` for desired.json, and the same suffixes under
``store.overrides.``, ``store.patches.``, ``store.processes.``, ``store.finished.``,
``store.operations.`` for the others.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import stat
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Protocol, TypeVar

from reconciler.daemon.clock import Clock
from reconciler.failpoints import failpoint
from reconciler.model.errors import (
    InvalidArgument,
    ReconcilerError,
    StaleGeneration,
    Unavailable,
)
from reconciler.model.ids import AgentId, Generation, OperationId, is_valid_agent_id
from reconciler.model.spec import (
    AgentSpec,
    DesiredState,
    HeartbeatSpec,
    NodeDesiredState,
    RestartPolicy,
    validate_node_state,
)
from reconciler.model.status import Override

__all__ = [
    "DESIRED_FILE",
    "FINISHED_FILE",
    "MAX_OPERATIONS",
    "OPERATIONS_FILE",
    "OVERRIDES_FILE",
    "PATCHES_FILE",
    "PROCESSES_FILE",
    "SCHEMA_VERSION",
    "CorruptFile",
    "DesiredStateStore",
    "FinishedEntry",
    "GenerationVerdict",
    "LoadResult",
    "MemoryStore",
    "OperationResult",
    "OverrideEntry",
    "Patches",
    "ProcessEntry",
    "StateDirInUse",
    "StateDirLock",
    "StateStore",
    "StoreError",
    "StoreWriteFailed",
    "UnsafeStateDir",
    "check_generation",
    "ensure_state_dir",
    "node_state_from_json",
    "node_state_to_json",
    "prune_overrides",
    "require_not_stale",
    "spec_from_json",
    "spec_to_json",
    "write_durably",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 1
DESIRED_FILE: Final = "desired.json"
OVERRIDES_FILE: Final = "overrides.json"
PATCHES_FILE: Final = "patches.json"
PROCESSES_FILE: Final = "processes.json"
FINISHED_FILE: Final = "finished.json"
OPERATIONS_FILE: Final = "operations.json"
LOCK_FILE: Final = "daemon.lock"
MAX_OPERATIONS: Final = 1024

_MAX_FILE_BYTES = 64 * 1024 * 1024
_MAX_JSON_DEPTH = 64
_MAX_OPERATION_ID = 256
_KEEP_CORRUPT = 10
_UNSAFE_MODE_BITS = stat.S_IWGRP | stat.S_IWOTH

T = TypeVar("T")


# ---------------------------------------------------------------------------------------
# Errors
#
#   ReconcilerError
#   └── StoreError                 the state directory cannot be used
#       ├── UnsafeStateDir         a symlink, not a directory, someone else's, or
#       │                          writable by group/others (permanent: fix the dir)
#       ├── StateDirInUse          another daemon holds it
#       └── StoreWriteFailed       a write failed (disk full, EIO); also Unavailable,
#                                  so it maps to UNAVAILABLE and may be retried
# ---------------------------------------------------------------------------------------


class StoreError(ReconcilerError):
    """The state directory cannot be used."""


class UnsafeStateDir(StoreError):
    """The state directory is a symlink, not ours, or writable by others."""


class StateDirInUse(StoreError):
    """Another running daemon holds the state directory."""


class StoreWriteFailed(StoreError, Unavailable):
    """Writing a state file failed; nothing was acknowledged and the old file stands."""


# ---------------------------------------------------------------------------------------
# Generations
# ---------------------------------------------------------------------------------------

GenerationVerdict = Literal["accept", "same", "stale"]


def check_generation(current: int, offered: int) -> GenerationVerdict:
    """Newer is accepted, the same is answered idempotently, older is stale."""
    if offered > current:
        return "accept"
    if offered == current:
        return "same"
    return "stale"


def require_not_stale(current: int, offered: int) -> Literal["accept", "same"]:
    """``check_generation``, raising ``StaleGeneration`` for an older generation."""
    verdict = check_generation(current, offered)
    if verdict == "stale":
        raise StaleGeneration(offered=offered, current=current)
    return verdict


# ---------------------------------------------------------------------------------------
# Records kept beside the desired state
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OverrideEntry:
    """An operator's local start or stop, set while ``generation`` was current."""

    override: Override
    generation: Generation


def prune_overrides(
    overrides: Mapping[AgentId, OverrideEntry], generation: int
) -> dict[AgentId, OverrideEntry]:
    """The overrides that survive the arrival of ``generation`` (older ones are dropped)."""
    return {agent: entry for agent, entry in overrides.items() if entry.generation >= generation}


@dataclass(frozen=True, slots=True)
class Patches:
    """The specs PushUpdate rolled agents to, over the desired state of ``generation``;
    a newer generation replaces them."""

    generation: Generation
    specs: Mapping[AgentId, AgentSpec] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ProcessEntry:
    """What identifies a live agent process across a daemon restart."""

    pid: int
    start_ticks: int
    """The process start time in clock ticks since boot (/proc/PID/stat field 22)."""
    cmdline: tuple[str, ...]
    fingerprint: str
    """``AgentSpec.fingerprint()`` of the spec it was started with."""
    started_at_wall_s: float
    token: str = ""
    """The agent's heartbeat token, so an adopted agent's HTTP heartbeats still verify."""
    boot_id: str = ""
    """The kernel's boot id when it was recorded: start ticks count from boot, so after
    a reboot the same pid and ticks name another process. "" in files from before."""


@dataclass(frozen=True, slots=True)
class FinishedEntry:
    """An agent that ended for good under its restart policy: completed (exit 0 under
    OnFailure or Never) or failed (under Never). It stays down until its spec changes
    or an operator restarts it, across daemon restarts within one boot."""

    fingerprint: str
    """``AgentSpec.fingerprint()`` of the spec that ended."""
    failed: bool
    exit_code: int | None
    signal: int | None
    exited_at_wall_s: float
    message: str
    boot_id: str


@dataclass(frozen=True, slots=True)
class OperationResult:
    """The answer an OperateAgent call gave, replayed when the same operation id returns."""

    agent_id: AgentId
    action: str
    success: bool
    message: str = ""
    at_wall_s: float = 0.0


@dataclass(frozen=True, slots=True)
class CorruptFile:
    """A state file that could not be used and was moved aside."""

    path: Path
    moved_to: Path | None
    """Where it went; ``None`` when even moving it failed."""
    reason: str


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What ``DesiredStateStore.load`` found."""

    state: NodeDesiredState
    corrupt: CorruptFile | None = None

    @property
    def was_corrupt(self) -> bool:
        """True when a file was found but could not be used."""
        return self.corrupt is not None


# ---------------------------------------------------------------------------------------
# AgentSpec <-> JSON
# ---------------------------------------------------------------------------------------

_SPEC_KEYS = frozenset(
    {
        "id",
        "command",
        "env",
        "working_dir",
        "version",
        "state",
        "restart_policy",
        "heartbeat",
        "stop_grace_period_s",
        "config",
        "labels",
        "user",
    }
)


def spec_to_json(spec: AgentSpec, *, path: str = "agent") -> dict[str, Any]:
    """A JSON-ready dict of every field; ``InvalidArgument`` when ``config`` is not JSON."""
    _check_json(spec.config, path=f"{path}.config", depth=0)
    heartbeat = spec.heartbeat
    return {
        "id": spec.id,
        "command": list(spec.command),
        "env": dict(spec.env),
        "working_dir": spec.working_dir,
        "version": spec.version,
        "state": str(spec.state),
        "restart_policy": str(spec.restart_policy),
        "heartbeat": None
        if heartbeat is None
        else {"interval_s": heartbeat.interval_s, "timeout_s": heartbeat.timeout_s},
        "stop_grace_period_s": spec.stop_grace_period_s,
        "config": _json_copy(spec.config),
        "labels": dict(spec.labels),
        "user": spec.user,
    }


def spec_from_json(obj: object, *, path: str = "agent") -> AgentSpec:
    """The spec ``spec_to_json`` wrote; ``InvalidArgument`` naming the first bad field."""
    data = _object(obj, path=path, keys=_SPEC_KEYS)
    return AgentSpec(
        id=AgentId(_string(data["id"], path=f"{path}.id")),
        command=tuple(_string_list(data["command"], path=f"{path}.command")),
        env=_string_map(data["env"], path=f"{path}.env"),
        working_dir=_string(data["working_dir"], path=f"{path}.working_dir"),
        version=_string(data["version"], path=f"{path}.version"),
        state=_enum(DesiredState, data["state"], path=f"{path}.state"),
        restart_policy=_enum(RestartPolicy, data["restart_policy"], path=f"{path}.restart_policy"),
        heartbeat=_heartbeat(data["heartbeat"], path=f"{path}.heartbeat"),
        stop_grace_period_s=_number(
            data["stop_grace_period_s"], path=f"{path}.stop_grace_period_s"
        ),
        config=_object(data["config"], path=f"{path}.config"),
        labels=_string_map(data["labels"], path=f"{path}.labels"),
        user=_string(data["user"], path=f"{path}.user"),
    )


def node_state_to_json(state: NodeDesiredState) -> dict[str, Any]:
    """A JSON-ready dict of a whole node state."""
    return {
        "generation": int(state.generation),
        "agents": [spec_to_json(s, path=f"agents[{i}]") for i, s in enumerate(state.agents)],
    }


def node_state_from_json(obj: object) -> NodeDesiredState:
    """The node state ``node_state_to_json`` wrote; ``InvalidArgument`` naming a bad field."""
    data = _object(obj, path="state", keys=frozenset({"generation", "agents"}))
    agents = _list(data["agents"], path="agents")
    return NodeDesiredState(
        generation=Generation(_integer(data["generation"], path="generation")),
        agents=tuple(spec_from_json(a, path=f"agents[{i}]") for i, a in enumerate(agents)),
    )


def _heartbeat(obj: object, *, path: str) -> HeartbeatSpec | None:
    if obj is None:
        return None
    data = _object(obj, path=path, keys=frozenset({"interval_s", "timeout_s"}))
    return HeartbeatSpec(
        interval_s=_number(data["interval_s"], path=f"{path}.interval_s"),
        timeout_s=_number(data["timeout_s"], path=f"{path}.timeout_s"),
    )


def _object(obj: object, *, path: str, keys: frozenset[str] | None = None) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise InvalidArgument(path, "must be an object")
    if keys is not None and set(obj) != keys:
        missing = sorted(keys - set(obj))
        extra = sorted(set(obj) - keys)
        raise InvalidArgument(path, f"missing keys {missing}, unknown keys {extra}")
    return obj


def _list(obj: object, *, path: str) -> list[Any]:
    if not isinstance(obj, list):
        raise InvalidArgument(path, "must be a list")
    return obj


def _string(obj: object, *, path: str) -> str:
    if not isinstance(obj, str):
        raise InvalidArgument(path, "must be a string")
    return obj


def _string_list(obj: object, *, path: str) -> list[str]:
    return [_string(item, path=f"{path}[{i}]") for i, item in enumerate(_list(obj, path=path))]


def _string_map(obj: object, *, path: str) -> dict[str, str]:
    data = _object(obj, path=path)
    return {key: _string(value, path=f"{path}[{key}]") for key, value in data.items()}


def _integer(obj: object, *, path: str) -> int:
    if isinstance(obj, bool) or not isinstance(obj, int):
        raise InvalidArgument(path, "must be an integer")
    return obj


def _number(obj: object, *, path: str) -> float:
    # An int stays an int, so the spec (and its fingerprint) round-trips exactly.
    if isinstance(obj, bool) or not isinstance(obj, int | float) or not math.isfinite(obj):
        raise InvalidArgument(path, "must be a finite number")
    return obj


def _enum(kind: type[DesiredState] | type[RestartPolicy], obj: object, *, path: str) -> Any:
    text = _string(obj, path=path)
    try:
        return kind(text)
    except ValueError:
        allowed = ", ".join(member.value for member in kind)
        raise InvalidArgument(path, f"{text!r} is not one of {allowed}") from None


def _check_json(value: object, *, path: str, depth: int) -> None:
    """Raise ``InvalidArgument`` unless ``value`` is plain, finite, bounded-depth JSON."""
    if depth > _MAX_JSON_DEPTH:
        raise InvalidArgument(path, f"nested deeper than {_MAX_JSON_DEPTH} levels")
    if value is None or isinstance(value, str | bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgument(path, "NaN and infinity are not JSON")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidArgument(path, f"object key {key!r} is not a string")
            _check_json(item, path=f"{path}.{key}", depth=depth + 1)
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_json(item, path=f"{path}[{index}]", depth=depth + 1)
        return
    raise InvalidArgument(path, f"a {type(value).__name__} is not JSON")


def _json_copy(value: Any) -> Any:
    """A deep copy as plain dicts and lists (tuples become lists, as JSON has no tuple)."""
    if isinstance(value, Mapping):
        return {key: _json_copy(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_copy(item) for item in value]
    return value


# ---------------------------------------------------------------------------------------
# The file envelope: schema version + checksum over the canonical body
# ---------------------------------------------------------------------------------------


class _Corrupt(Exception):
    """A state file's content cannot be used (internal: becomes a ``CorruptFile``)."""


def _canonical(value: object) -> bytes:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return text.encode("ascii")


def _checksum(body: object) -> str:
    return "sha256:" + hashlib.sha256(_canonical(body)).hexdigest()


def _encode_envelope(kind: str, body: object) -> bytes:
    """The canonical JSON of the envelope, encoding the body once (keys in sorted order)."""
    body_bytes = _canonical(body)
    checksum = "sha256:" + hashlib.sha256(body_bytes).hexdigest()
    tail = _canonical({"checksum": checksum, "kind": kind, "schema_version": SCHEMA_VERSION})
    return b'{"body":' + body_bytes + b"," + tail[1:] + b"\n"


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _decode_envelope(data: bytes, kind: str) -> object:
    try:
        envelope = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise _Corrupt(f"not JSON ({exc.__class__.__name__}: {str(exc)[:120]})") from None
    if not isinstance(envelope, dict):
        raise _Corrupt("not a JSON object")
    version = envelope.get("schema_version")
    if version != SCHEMA_VERSION:
        raise _Corrupt(f"unknown schema_version {version!r} (this daemon reads {SCHEMA_VERSION})")
    if envelope.get("kind") != kind:
        raise _Corrupt(f"kind is {envelope.get('kind')!r}, expected {kind!r}")
    body = envelope.get("body")
    if envelope.get("checksum") != _checksum(body):
        raise _Corrupt("checksum mismatch")
    return body


# ---------------------------------------------------------------------------------------
# The state directory and the durable write
# ---------------------------------------------------------------------------------------


def ensure_state_dir(path: Path) -> Path:
    """Create ``path`` 0700, or check an existing one; raise ``UnsafeStateDir`` if unsafe."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StoreError(f"state directory {path}: cannot create it: {exc.strerror}") from exc
    info = os.lstat(path)
    _check_dir_safe(path, info)
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)  # also undoes the umask on a fresh mkdir
    return path


def _check_dir_safe(path: Path, info: os.stat_result) -> None:
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeStateDir(f"state directory {path} is a symlink; use the real path")
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeStateDir(f"state directory {path} exists and is not a directory")
    if info.st_uid != os.geteuid():
        raise UnsafeStateDir(
            f"state directory {path} belongs to uid {info.st_uid}, not to this daemon's "
            f"uid {os.geteuid()}"
        )
    if info.st_mode & _UNSAFE_MODE_BITS:
        raise UnsafeStateDir(
            f"state directory {path} is writable by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); run chmod 0700 {path}"
        )


class StateDirLock:
    """An exclusive ``flock`` on ``<state_dir>/daemon.lock``, held while a daemon runs.

    Two daemons on one state directory would each adopt, start and stop the same
    agents and overwrite each other's files, so the second one refuses to start,
    naming the first one's pid (written into the file). The kernel drops the lock
    when its holder dies, however it dies, so a lock is never stale and nothing needs
    cleaning after a crash. The descriptor is close-on-exec and agents are spawned
    with every other descriptor closed, so no agent, even one that outlives the
    daemon, holds the lock.
    """

    def __init__(self, state_dir: Path) -> None:
        self._fd: int | None = None
        path = ensure_state_dir(state_dir) / LOCK_FILE
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise StoreError(f"{path}: cannot open the lock file: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise StateDirInUse(
                f"state directory {state_dir} is in use by another daemon{who}; "
                "a second daemon on this host needs a state_dir of its own"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"{path}: cannot lock it: {exc.strerror}") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Let another daemon take the directory (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        self.release()


def write_durably(path: Path, data: bytes, *, failpoint_prefix: str, sync: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically; with ``sync``, durably (fsync file and dir).

    Raises ``StoreWriteFailed`` when the write fails; the old file then stands.
    """
    failpoint(f"{failpoint_prefix}.before_write")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise StoreWriteFailed(f"creating a temp file beside {path}: {exc.strerror}") from exc
    try:
        try:
            _write_all(fd, data)
            failpoint(f"{failpoint_prefix}.after_tmp_write")
            if sync:
                os.fsync(fd)
            failpoint(f"{failpoint_prefix}.after_tmp_fsync")
        finally:
            os.close(fd)
        os.replace(tmp_name, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        if isinstance(exc, OSError):
            raise StoreWriteFailed(f"writing {path}: {exc.strerror or exc}") from exc
        raise
    failpoint(f"{failpoint_prefix}.after_rename")
    if sync:
        _fsync_dir(path.parent)
    failpoint(f"{failpoint_prefix}.after_dir_fsync")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise StoreWriteFailed(f"fsync of {directory}: {exc.strerror or exc}") from exc


def _read_state_file(path: Path) -> bytes | None:
    """The file's bytes, ``None`` when absent; ``_Corrupt`` when it must not be used."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _Corrupt("is a symlink") from None
        raise StoreError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        _check_file_safe(info)
        return _read_all(fd, info.st_size)
    finally:
        os.close(fd)


def _check_file_safe(info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise _Corrupt("is not a regular file")
    if info.st_uid != os.geteuid():
        raise _Corrupt(f"belongs to uid {info.st_uid}, not {os.geteuid()}")
    if info.st_mode & _UNSAFE_MODE_BITS:
        raise _Corrupt(f"is writable by group or others ({stat.S_IMODE(info.st_mode):04o})")
    if info.st_size > _MAX_FILE_BYTES:
        raise _Corrupt(f"is {info.st_size} bytes, over the {_MAX_FILE_BYTES} byte limit")


def _read_all(fd: int, size: int) -> bytes:
    chunks: list[bytes] = []
    remaining = size + 1  # one byte more tells us the file grew past the limit check
    while remaining > 0:
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------


class StateStore(Protocol):
    """What the controller needs from the state directory."""

    @property
    def current(self) -> NodeDesiredState: ...

    def load(self) -> LoadResult: ...

    def save(self, state: NodeDesiredState) -> None: ...

    def load_overrides(self) -> dict[AgentId, OverrideEntry]: ...

    def save_overrides(self, overrides: Mapping[AgentId, OverrideEntry]) -> None: ...

    def load_patches(self) -> Patches: ...

    def save_patches(self, patches: Patches) -> None: ...

    def load_processes(self) -> dict[AgentId, ProcessEntry]: ...

    def save_processes(self, processes: Mapping[AgentId, ProcessEntry]) -> None: ...

    def load_finished(self) -> dict[AgentId, FinishedEntry]: ...

    def save_finished(self, finished: Mapping[AgentId, FinishedEntry]) -> None: ...

    def remember_operation(self, operation_id: OperationId, result: OperationResult) -> None: ...

    def lookup_operation(self, operation_id: OperationId) -> OperationResult | None: ...


class DesiredStateStore:
    """The node's state directory on disk (see the module note for the files)."""

    def __init__(
        self,
        state_dir: Path,
        *,
        clock: Clock,
        max_operations: int = MAX_OPERATIONS,
        sync_processes: bool = False,
    ) -> None:
        self._dir = ensure_state_dir(state_dir)
        self._clock = clock
        self._max_operations = max_operations
        self._sync_processes = sync_processes
        self._current = NodeDesiredState(generation=Generation(0))
        self._operations: OrderedDict[OperationId, OperationResult] | None = None
        self._corrupt: list[CorruptFile] = []
        self._remove_stale_temp_files()

    @property
    def state_dir(self) -> Path:
        """The directory this store owns."""
        return self._dir

    @property
    def current(self) -> NodeDesiredState:
        """The desired state last loaded or saved (generation 0 and empty before)."""
        return self._current

    @property
    def corrupt_files(self) -> tuple[CorruptFile, ...]:
        """Every file moved aside since this store was opened."""
        return tuple(self._corrupt)

    # -- desired.json ---------------------------------------------------------------

    def load(self) -> LoadResult:
        """Read desired.json; empty generation 0 when absent or moved aside as corrupt."""
        state, corrupt = self._load(DESIRED_FILE, "desired", _decode_desired)
        self._current = state if state is not None else NodeDesiredState(Generation(0))
        return LoadResult(state=self._current, corrupt=corrupt)

    def save(self, state: NodeDesiredState) -> None:
        """Persist ``state`` durably; ``StaleGeneration`` if older than the current one."""
        require_not_stale(self._current.generation, state.generation)
        self._write(DESIRED_FILE, "desired", node_state_to_json(state), prefix="store")
        self._current = state

    # -- overrides.json -------------------------------------------------------------

    def load_overrides(self) -> dict[AgentId, OverrideEntry]:
        """The operator's local overrides (empty when absent or corrupt)."""
        overrides, _ = self._load(OVERRIDES_FILE, "overrides", _decode_overrides)
        return overrides or {}

    def save_overrides(self, overrides: Mapping[AgentId, OverrideEntry]) -> None:
        """Persist the overrides durably."""
        body = {
            agent: {"override": str(entry.override), "generation": int(entry.generation)}
            for agent, entry in overrides.items()
        }
        self._write(OVERRIDES_FILE, "overrides", body, prefix="store.overrides")

    # -- patches.json ---------------------------------------------------------------

    def load_patches(self) -> Patches:
        """The updates in force (none when absent or corrupt)."""
        patches, _ = self._load(PATCHES_FILE, "patches", _decode_patches)
        return patches or Patches(Generation(0))

    def save_patches(self, patches: Patches) -> None:
        """Persist the updates in force durably."""
        body = {
            "generation": int(patches.generation),
            "agents": {agent: spec_to_json(spec) for agent, spec in patches.specs.items()},
        }
        self._write(PATCHES_FILE, "patches", body, prefix="store.patches")

    # -- processes.json -------------------------------------------------------------

    def load_processes(self) -> dict[AgentId, ProcessEntry]:
        """The agent processes last recorded (empty when absent or corrupt)."""
        processes, _ = self._load(PROCESSES_FILE, "processes", _decode_processes)
        return processes or {}

    def save_processes(self, processes: Mapping[AgentId, ProcessEntry]) -> None:
        """Persist the live processes atomically (fsync only with ``sync_processes``)."""
        body = {agent: _process_to_json(entry) for agent, entry in processes.items()}
        self._write(
            PROCESSES_FILE,
            "processes",
            body,
            prefix="store.processes",
            sync=self._sync_processes,
        )

    # -- finished.json --------------------------------------------------------------

    def load_finished(self) -> dict[AgentId, FinishedEntry]:
        """The agents last recorded as ended for good (empty when absent or corrupt)."""
        finished, _ = self._load(FINISHED_FILE, "finished", _decode_finished)
        return finished or {}

    def save_finished(self, finished: Mapping[AgentId, FinishedEntry]) -> None:
        """Persist the finished agents atomically (fsync only with ``sync_processes``)."""
        body = {agent: _finished_to_json(entry) for agent, entry in finished.items()}
        self._write(
            FINISHED_FILE, "finished", body, prefix="store.finished", sync=self._sync_processes
        )

    # -- operations.json ------------------------------------------------------------

    def remember_operation(self, operation_id: OperationId, result: OperationResult) -> None:
        """Record an operation's result durably, forgetting the oldest past the bound."""
        if not operation_id or len(operation_id) > _MAX_OPERATION_ID:
            raise InvalidArgument("operation_id", f"must be 1 to {_MAX_OPERATION_ID} characters")
        operations = self._loaded_operations()
        operations[operation_id] = result
        operations.move_to_end(operation_id)
        while len(operations) > self._max_operations:
            operations.popitem(last=False)
        body = [_operation_to_json(op_id, entry) for op_id, entry in operations.items()]
        self._write(OPERATIONS_FILE, "operations", body, prefix="store.operations")

    def lookup_operation(self, operation_id: OperationId) -> OperationResult | None:
        """The result recorded for ``operation_id``, if it is still remembered."""
        return self._loaded_operations().get(operation_id)

    def _loaded_operations(self) -> OrderedDict[OperationId, OperationResult]:
        if self._operations is None:
            loaded, _ = self._load(OPERATIONS_FILE, "operations", _decode_operations)
            self._operations = OrderedDict(loaded or {})
        return self._operations

    # -- shared plumbing ------------------------------------------------------------

    def _write(self, name: str, kind: str, body: object, *, prefix: str, sync: bool = True) -> None:
        data = _encode_envelope(kind, body)
        if len(data) > _MAX_FILE_BYTES:
            raise StoreWriteFailed(f"{name}: {len(data)} bytes is over {_MAX_FILE_BYTES}")
        write_durably(self._dir / name, data, failpoint_prefix=prefix, sync=sync)

    def _load(
        self, name: str, kind: str, decode: Callable[[object], T]
    ) -> tuple[T | None, CorruptFile | None]:
        """The decoded file; ``None`` when absent or moved aside (then with the report)."""
        path = self._dir / name
        try:
            data = _read_state_file(path)
            if data is None:
                return None, None
            if len(data) > _MAX_FILE_BYTES:
                raise _Corrupt("grew past the size limit while being read")
            return decode(_decode_envelope(data, kind)), None
        except _Corrupt as exc:
            return None, self._move_aside(path, str(exc))
        except InvalidArgument as exc:
            return None, self._move_aside(path, f"bad content: {exc}")

    def _move_aside(self, path: Path, reason: str) -> CorruptFile:
        target = self._corrupt_name(path)
        try:
            os.replace(path, target)
            _fsync_dir(self._dir)
            moved: Path | None = target
        except (OSError, StoreWriteFailed) as exc:
            log.error("could not move the corrupt file %s aside: %s", path, exc)
            moved = None
        corrupt = CorruptFile(path=path, moved_to=moved, reason=reason)
        self._corrupt.append(corrupt)
        log.error("state file %s is unusable (%s); moved to %s", path, reason, moved)
        self._prune_corrupt(path.name)
        return corrupt

    def _corrupt_name(self, path: Path) -> Path:
        wall_s = self._clock.wall()
        micros = int(wall_s * 1_000_000) % 1_000_000
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(wall_s)) + f".{micros:06d}Z"
        target = path.with_name(f"{path.name}.corrupt-{stamp}")
        counter = 1
        while os.path.lexists(target):
            target = path.with_name(f"{path.name}.corrupt-{stamp}-{counter}")
            counter += 1
        return target

    def _prune_corrupt(self, name: str) -> None:
        """Keep the newest few moved-aside copies of ``name`` so they cannot fill the disk."""
        kept = sorted(self._dir.glob(f"{name}.corrupt-*"), key=lambda p: p.lstat().st_mtime)
        for old in kept[:-_KEEP_CORRUPT]:
            with contextlib.suppress(OSError):
                old.unlink()

    def _remove_stale_temp_files(self) -> None:
        """Temp files left by a crash mid-write were never renamed in: remove them."""
        for name in (DESIRED_FILE, OVERRIDES_FILE, PROCESSES_FILE, OPERATIONS_FILE):
            for leftover in self._dir.glob(f".{name}.*.tmp"):
                with contextlib.suppress(OSError):
                    leftover.unlink()


# ---------------------------------------------------------------------------------------
# Body decoders (each raises InvalidArgument naming the bad field)
# ---------------------------------------------------------------------------------------


def _decode_desired(body: object) -> NodeDesiredState:
    state = node_state_from_json(body)
    validate_node_state(state)
    return state


def _agent_key(key: str, *, path: str) -> AgentId:
    if not is_valid_agent_id(key):
        raise InvalidArgument(path, f"{key!r} is not a valid agent id")
    return AgentId(key)


def _decode_overrides(body: object) -> dict[AgentId, OverrideEntry]:
    result: dict[AgentId, OverrideEntry] = {}
    for key, value in _object(body, path="overrides").items():
        path = f"overrides[{key}]"
        data = _object(value, path=path, keys=frozenset({"override", "generation"}))
        text = _string(data["override"], path=f"{path}.override")
        try:
            override = Override(text)
        except ValueError:
            raise InvalidArgument(f"{path}.override", f"{text!r} is not start or stop") from None
        generation = Generation(_integer(data["generation"], path=f"{path}.generation"))
        result[_agent_key(key, path=path)] = OverrideEntry(override, generation)
    return result


def _decode_patches(body: object) -> Patches:
    data = _object(body, path="patches", keys=frozenset({"generation", "agents"}))
    generation = Generation(_integer(data["generation"], path="patches.generation"))
    specs: dict[AgentId, AgentSpec] = {}
    for key, value in _object(data["agents"], path="patches.agents").items():
        path = f"patches.agents[{key}]"
        spec = spec_from_json(value, path=path)
        if spec.id != key:
            raise InvalidArgument(f"{path}.id", f"{spec.id!r} is filed under {key!r}")
        specs[_agent_key(key, path=path)] = spec
    return Patches(generation, specs)


_PROCESS_KEYS = frozenset(
    {"pid", "start_ticks", "cmdline", "fingerprint", "started_at_wall_s", "token"}
)


def _process_to_json(entry: ProcessEntry) -> dict[str, Any]:
    return {
        "pid": entry.pid,
        "start_ticks": entry.start_ticks,
        "cmdline": list(entry.cmdline),
        "fingerprint": entry.fingerprint,
        "started_at_wall_s": entry.started_at_wall_s,
        "token": entry.token,
        "boot_id": entry.boot_id,
    }


def _decode_processes(body: object) -> dict[AgentId, ProcessEntry]:
    result: dict[AgentId, ProcessEntry] = {}
    for key, value in _object(body, path="processes").items():
        path = f"processes[{key}]"
        keys = (
            _PROCESS_KEYS | {"boot_id"}
            if isinstance(value, dict) and "boot_id" in value
            else _PROCESS_KEYS
        )
        data = _object(value, path=path, keys=keys)
        pid = _integer(data["pid"], path=f"{path}.pid")
        if pid <= 0:
            raise InvalidArgument(f"{path}.pid", "must be positive")
        result[_agent_key(key, path=path)] = ProcessEntry(
            pid=pid,
            start_ticks=_integer(data["start_ticks"], path=f"{path}.start_ticks"),
            cmdline=tuple(_string_list(data["cmdline"], path=f"{path}.cmdline")),
            fingerprint=_string(data["fingerprint"], path=f"{path}.fingerprint"),
            started_at_wall_s=_number(data["started_at_wall_s"], path=f"{path}.started_at_wall_s"),
            token=_string(data["token"], path=f"{path}.token"),
            boot_id=_string(data.get("boot_id", ""), path=f"{path}.boot_id"),
        )
    return result


_FINISHED_KEYS = frozenset(
    {"fingerprint", "failed", "exit_code", "signal", "exited_at_wall_s", "message", "boot_id"}
)


def _finished_to_json(entry: FinishedEntry) -> dict[str, Any]:
    return {
        "fingerprint": entry.fingerprint,
        "failed": entry.failed,
        "exit_code": entry.exit_code,
        "signal": entry.signal,
        "exited_at_wall_s": entry.exited_at_wall_s,
        "message": entry.message,
        "boot_id": entry.boot_id,
    }


def _optional_integer(obj: object, *, path: str) -> int | None:
    return None if obj is None else _integer(obj, path=path)


def _decode_finished(body: object) -> dict[AgentId, FinishedEntry]:
    result: dict[AgentId, FinishedEntry] = {}
    for key, value in _object(body, path="finished").items():
        path = f"finished[{key}]"
        data = _object(value, path=path, keys=_FINISHED_KEYS)
        failed = data["failed"]
        if not isinstance(failed, bool):
            raise InvalidArgument(f"{path}.failed", "must be true or false")
        result[_agent_key(key, path=path)] = FinishedEntry(
            fingerprint=_string(data["fingerprint"], path=f"{path}.fingerprint"),
            failed=failed,
            exit_code=_optional_integer(data["exit_code"], path=f"{path}.exit_code"),
            signal=_optional_integer(data["signal"], path=f"{path}.signal"),
            exited_at_wall_s=_number(data["exited_at_wall_s"], path=f"{path}.exited_at_wall_s"),
            message=_string(data["message"], path=f"{path}.message"),
            boot_id=_string(data["boot_id"], path=f"{path}.boot_id"),
        )
    return result


_OPERATION_KEYS = frozenset({"id", "agent_id", "action", "success", "message", "at_wall_s"})


def _operation_to_json(operation_id: OperationId, result: OperationResult) -> dict[str, Any]:
    return {
        "id": operation_id,
        "agent_id": result.agent_id,
        "action": result.action,
        "success": result.success,
        "message": result.message,
        "at_wall_s": result.at_wall_s,
    }


def _decode_operations(body: object) -> dict[OperationId, OperationResult]:
    result: dict[OperationId, OperationResult] = {}
    for index, item in enumerate(_list(body, path="operations")):
        path = f"operations[{index}]"
        data = _object(item, path=path, keys=_OPERATION_KEYS)
        success = data["success"]
        if not isinstance(success, bool):
            raise InvalidArgument(f"{path}.success", "must be true or false")
        operation_id = OperationId(_string(data["id"], path=f"{path}.id"))
        result[operation_id] = OperationResult(
            agent_id=AgentId(_string(data["agent_id"], path=f"{path}.agent_id")),
            action=_string(data["action"], path=f"{path}.action"),
            success=success,
            message=_string(data["message"], path=f"{path}.message"),
            at_wall_s=_number(data["at_wall_s"], path=f"{path}.at_wall_s"),
        )
    return result


# ---------------------------------------------------------------------------------------
# The fake
# ---------------------------------------------------------------------------------------


@dataclass
class MemoryStore:
    """An in-memory ``StateStore`` for unit tests; ``saves`` counts desired-state saves."""

    desired: NodeDesiredState = field(default_factory=lambda: NodeDesiredState(Generation(0)))
    overrides: dict[AgentId, OverrideEntry] = field(default_factory=dict)
    patches: Patches = field(default_factory=lambda: Patches(Generation(0)))
    processes: dict[AgentId, ProcessEntry] = field(default_factory=dict)
    finished: dict[AgentId, FinishedEntry] = field(default_factory=dict)
    operations: OrderedDict[OperationId, OperationResult] = field(default_factory=OrderedDict)
    max_operations: int = MAX_OPERATIONS
    saves: int = 0
    fail_saves: bool = False
    """When true, ``save`` raises ``StoreWriteFailed`` (a full disk) and changes nothing."""

    @property
    def current(self) -> NodeDesiredState:
        return self.desired

    def load(self) -> LoadResult:
        return LoadResult(state=self.desired)

    def save(self, state: NodeDesiredState) -> None:
        if self.fail_saves:
            raise StoreWriteFailed("writing desired.json: No space left on device")
        require_not_stale(self.desired.generation, state.generation)
        node_state_to_json(state)  # the same JSON check the real store makes
        self.desired = state
        self.saves += 1

    def load_overrides(self) -> dict[AgentId, OverrideEntry]:
        return dict(self.overrides)

    def save_overrides(self, overrides: Mapping[AgentId, OverrideEntry]) -> None:
        self.overrides = dict(overrides)

    def load_patches(self) -> Patches:
        return self.patches

    def save_patches(self, patches: Patches) -> None:
        for spec in patches.specs.values():
            spec_to_json(spec)  # the same JSON check the real store makes
        self.patches = patches

    def load_processes(self) -> dict[AgentId, ProcessEntry]:
        return dict(self.processes)

    def save_processes(self, processes: Mapping[AgentId, ProcessEntry]) -> None:
        self.processes = dict(processes)

    def load_finished(self) -> dict[AgentId, FinishedEntry]:
        return dict(self.finished)

    def save_finished(self, finished: Mapping[AgentId, FinishedEntry]) -> None:
        self.finished = dict(finished)

    def remember_operation(self, operation_id: OperationId, result: OperationResult) -> None:
        self.operations[operation_id] = result
        self.operations.move_to_end(operation_id)
        while len(self.operations) > self.max_operations:
            self.operations.popitem(last=False)

    def lookup_operation(self, operation_id: OperationId) -> OperationResult | None:
        return self.operations.get(operation_id)
