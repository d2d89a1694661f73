"""The Unix-socket heartbeat receiver: JSON lines over a path socket, peer-checked.

What: ``UnixHeartbeatReceiver`` listens on a path socket (never abstract) in a
private directory (created 0700 when missing; the socket itself is 0660, set before
``listen`` so no one connects to it earlier). A stale socket is removed at start and
ours is removed at stop; a socket another process serves, or anything that is not a
socket, is an error and never deleted (``reconciler.daemon.unixsocket``). Each
connection is an ``asyncio.Protocol`` (about six times cheaper than a StreamReader)
that splits lines itself: at most ``max_frame_bytes`` per line including the newline,
counted while still buffered, so a line without an end is refused once it is too
long. SO_PEERCRED is read on accept; a heartbeat for agent X is accepted when the
peer is X's process or below it, or the line carries X's token. A bad line gets one
``{"error": <reason>, "field": <name or null>}`` line and the connection is closed;
success writes nothing. One budget of ``lines_per_turn`` lines is shared by every
connection per event-loop turn: a connection that finds it spent pauses reading and
waits in line for the next turn, so a flood over any number of connections cannot
starve the control loop.

What not: no meaning of heartbeats (the sink), no HTTP (``http``), no decoding
rules (``codec``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec

from reconciler.daemon import unixsocket
from reconciler.daemon.clock import Clock, SystemClock
from reconciler.daemon.heartbeat.codec import HeartbeatError, decode_heartbeat
from reconciler.daemon.heartbeat.contract import (
    MAX_FRAME_BYTES,
    AgentDirectory,
    AgentIdentity,
    HeartbeatSink,
    RejectReason,
    Transport,
)
from reconciler.daemon.heartbeat.identity import PeerChecker, peer_credentials, tokens_match
from reconciler.daemon.heartbeat.stats import HeartbeatStats, TransportCounters
from reconciler.daemon.unixsocket import SocketPathError

__all__ = ["SocketPathError", "UnixHeartbeatReceiver", "UnixReceiverConfig", "error_line"]

_log = logging.getLogger(__name__)
_SOCKET_MODE: Final = 0o660
_DIR_MODE: Final = 0o700


@dataclass(frozen=True, slots=True)
class UnixReceiverConfig:
    """Limits of the Unix-socket receiver (mirrors the ``heartbeat`` settings)."""

    socket_path: Path
    max_frame_bytes: int = MAX_FRAME_BYTES
    """One line, newline included."""
    max_connections: int = 4096
    idle_timeout_s: float = 60.0
    """A connection silent this long is closed (agents send every few seconds)."""
    allow_unmanaged: bool = False
    """Hand heartbeats of unknown agent ids to the sink instead of refusing them."""
    lines_per_turn: int = 1024
    """Lines all connections together handle before the event loop gets a turn (~2 ms)."""
    backlog: int = 1024


def error_line(reason: RejectReason, field: str | None) -> bytes:
    """The one line written before a connection is closed for ``reason``."""
    return msgspec.json.encode({"error": reason, "field": field}) + b"\n"


class UnixHeartbeatReceiver:
    """Accepts heartbeat lines on a Unix socket and hands valid ones to the sink."""

    def __init__(
        self,
        config: UnixReceiverConfig,
        *,
        directory: AgentDirectory,
        sink: HeartbeatSink,
        stats: HeartbeatStats | None = None,
        clock: Clock | None = None,
        peers: PeerChecker | None = None,
    ) -> None:
        self.config = config
        self.directory = directory
        self.sink = sink
        self.stats = stats if stats is not None else HeartbeatStats()
        self.counters: TransportCounters = self.stats.counters(Transport.UNIX)
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.peers = peers if peers is not None else PeerChecker()
        self.connections: set[_Connection] = set()
        self.budget = _TurnBudget(config.lines_per_turn)
        self._server: asyncio.AbstractServer | None = None
        self._identity: unixsocket.Identity | None = None

    @property
    def path(self) -> Path:
        """Where the socket lives."""
        return self.config.socket_path

    async def start(self) -> None:
        """Bind, set the mode, then listen."""
        if self._server is not None:
            raise RuntimeError("the Unix heartbeat receiver is already started")
        sock = _bind(self.path)
        self._identity = unixsocket.identity(self.path)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(
            lambda: _Connection(self), sock=sock, backlog=self.config.backlog
        )
        _log.info("heartbeat socket listening", extra={"path": str(self.path)})

    async def stop(self) -> None:
        """Stop accepting, close every connection, remove our socket file."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for connection in list(self.connections):
            connection.close()
        await server.wait_closed()
        self._remove_own_socket()

    def _remove_own_socket(self) -> None:
        unixsocket.remove_own(self.path, self._identity)
        self._identity = None


def _bind(path: Path) -> socket.socket:
    """A bound (not yet listening) socket at ``path`` with mode 0660."""
    _prepare_directory(path.parent)
    unixsocket.claim(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(path))
        os.chmod(path, _SOCKET_MODE)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _prepare_directory(directory: Path) -> None:
    if not directory.exists():
        directory.mkdir(mode=_DIR_MODE, parents=True)
        return
    if directory.stat().st_mode & 0o002:
        _log.warning(
            "heartbeat socket directory is world-writable; use a private directory",
            extra={"path": str(directory)},
        )


class _TurnBudget:
    """Lines every connection together may handle before the event loop gets a turn.

    The first line taken in a turn schedules a refill with ``call_soon``, which runs on
    the next turn, after everything else that was ready; connections that found the
    budget spent wait in FIFO order and are resumed by the refill.
    """

    def __init__(self, per_turn: int) -> None:
        self.per_turn = max(1, per_turn)
        self.left = self.per_turn
        self._armed = False
        self._waiting: deque[_Connection] = deque()

    def take(self, wanted: int) -> int:
        """Up to ``wanted`` lines for this turn (0 when spent)."""
        self._arm()
        granted = min(wanted, self.left)
        self.left -= granted
        return granted

    def wait(self, connection: _Connection) -> None:
        """Resume ``connection`` on a later turn."""
        self._waiting.append(connection)
        self._arm()

    def _arm(self) -> None:
        if not self._armed:
            self._armed = True
            asyncio.get_running_loop().call_soon(self._refill)

    def _refill(self) -> None:
        self._armed = False
        self.left = self.per_turn
        waiting = self._waiting
        while waiting and self.left > 0:
            waiting.popleft().resume_after_wait()


class _Connection(asyncio.Protocol):
    """One agent connection: split lines, decode, authenticate, record."""

    def __init__(self, receiver: UnixHeartbeatReceiver) -> None:
        self._receiver = receiver
        self._counters = receiver.counters
        self._config = receiver.config
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._clock = receiver.clock
        self._budget = receiver.budget
        self._identity = receiver.directory.identity
        self._record = receiver.sink.record
        self._max_line_bytes = receiver.config.max_frame_bytes - 1  # without the newline
        self._partial = bytearray()
        self._lines: list[bytes] | None = None
        self._index = 0
        self._peer_pid: int | None = None
        self._trusted: tuple[str, int] | None = None
        self._closing = False
        self._paused = False
        self._last_activity = self._loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None

    # -- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        receiver = self._receiver
        if len(receiver.connections) >= self._config.max_connections:
            self._counters.reject(RejectReason.TOO_MANY_CONNECTIONS)
            self._refuse(RejectReason.TOO_MANY_CONNECTIONS, None)
            return
        receiver.connections.add(self)
        self._counters.open_connections += 1
        credentials = peer_credentials(transport.get_extra_info("socket"))
        self._peer_pid = credentials.pid if credentials is not None else None
        self._arm_idle_timer(self._last_activity + self._config.idle_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._partial.clear()
        self._lines = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self in self._receiver.connections:
            self._receiver.connections.discard(self)
            self._counters.open_connections -= 1

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._last_activity = self._loop.time()
        if self._lines is not None or b"\n" not in data:
            self._partial += data  # only new bytes are scanned: a trickle stays linear
            if self._lines is None:
                self._check_partial()
            return
        if self._partial:
            data = bytes(self._partial) + data
            self._partial.clear()
        self._split(data)

    def eof_received(self) -> bool | None:
        return None  # close our side too; a partial last line is dropped

    def close(self) -> None:
        """Close without an answer (daemon stopping, idle)."""
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    # -- line handling -----------------------------------------------------------------

    def _split(self, data: bytes) -> None:
        """Queue the complete lines of ``data``; keep its unterminated tail."""
        lines = data.split(b"\n")
        tail = lines.pop()
        if tail:
            self._partial += tail
        self._lines = lines
        self._index = 0
        self._process()

    def _process(self) -> None:
        """Handle up to ``lines_per_turn`` queued lines, then yield or resume reading."""
        lines = self._lines
        assert lines is not None
        index = self._index
        stop = index + self._budget.take(len(lines) - index)
        limit = self._config.max_frame_bytes  # a line and its newline
        received_at_s = self._clock.monotonic()
        handle = self._handle_line
        while index < stop:
            line = lines[index]
            index += 1
            if len(line) >= limit:
                self._reject_too_large()
                return
            if not handle(line, received_at_s):
                return
        if index < len(lines):
            self._index = index
            self._wait_for_budget()
            return
        self._lines = None
        if b"\n" in self._partial:  # arrived while we were yielding
            data = bytes(self._partial)
            self._partial.clear()
            self._split(data)
            return
        self._check_partial()
        self._resume_reading()

    def _check_partial(self) -> None:
        if len(self._partial) >= self._config.max_frame_bytes:
            self._reject_too_large()

    def _handle_line(self, line: bytes, received_at_s: float) -> bool:
        """Handle one line; False when the connection is being closed."""
        counters = self._counters
        counters.received += 1
        try:
            heartbeat, token = decode_heartbeat(line, max_bytes=self._max_line_bytes)
        except HeartbeatError as exc:
            self._reject(exc.reason, exc.field)
            return False
        identity = self._identity(heartbeat.agent_id)
        if identity is None:
            if not self._config.allow_unmanaged:
                self._reject(RejectReason.UNKNOWN_AGENT, "agent_id")
                return False
        elif not self._authorized(heartbeat.agent_id, identity, token):
            self._reject(RejectReason.FORBIDDEN, "agent_id")
            return False
        try:
            self._record(heartbeat, received_at_s=received_at_s, transport="unix")
        except Exception:
            _log.exception("heartbeat sink failed", extra={"agent_id": heartbeat.agent_id})
            counters.sink_errors += 1
        counters.accepted += 1
        return True

    def _authorized(self, agent_id: str, identity: AgentIdentity, token: str | None) -> bool:
        agent_pid = identity.pid
        if agent_pid is not None and self._peer_pid is not None:
            if self._trusted == (agent_id, agent_pid):
                return True
            if self._receiver.peers.is_same_or_descendant(self._peer_pid, agent_pid):
                self._trusted = (agent_id, agent_pid)
                return True
        return token is not None and tokens_match(token, identity.token)

    # -- flow control and closing ------------------------------------------------------

    def _wait_for_budget(self) -> None:
        """Stop reading and let the loop take a turn before handling more lines."""
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._budget.wait(self)

    def resume_after_wait(self) -> None:
        """Called by the budget on a later turn."""
        if not self._closing and self._lines is not None:
            self._process()

    def _resume_reading(self) -> None:
        if self._paused and self._transport is not None and not self._closing:
            self._paused = False
            self._transport.resume_reading()

    def _reject_too_large(self) -> None:
        self._counters.received += 1
        self._reject(RejectReason.TOO_LARGE, None)

    def _reject(self, reason: RejectReason, field: str | None) -> None:
        self._counters.reject(reason)
        self._refuse(reason, field)

    def _refuse(self, reason: RejectReason, field: str | None) -> None:
        self._closing = True
        self._partial.clear()
        self._lines = None
        if self._transport is not None:
            self._transport.write(error_line(reason, field))
            self._transport.close()

    def _arm_idle_timer(self, when: float) -> None:
        self._idle_timer = self._loop.call_at(when, self._on_idle_timer)

    def _on_idle_timer(self) -> None:
        if self._closing:
            return
        deadline = self._last_activity + self._config.idle_timeout_s
        if self._loop.time() >= deadline:
            self.close()
        else:
            self._arm_idle_timer(deadline)
