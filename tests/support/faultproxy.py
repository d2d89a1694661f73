"""A TCP fault proxy for tests: put it between a client and a server, then break the
network between them on purpose.

``FaultProxy(target)`` listens on a free 127.0.0.1 port (``start`` returns it) and
forwards every connection to ``target`` (loopback only). ``set_mode`` changes how it
behaves, at once and from any thread:

- ``Pass()``: forward bytes as they come.
- ``Delay(delay_s, jitter_s)``: hold every chunk ``delay_s`` plus up to ``jitter_s``
  (uniform) before forwarding it, in both directions, keeping the byte order (a later
  chunk never overtakes an earlier one). Throughput is not limited: this is latency.
- ``Blackhole()``: accept new connections and read what arrives, but drop it and
  never answer or connect to the target. Established connections stall: nothing is
  forwarded either way until the mode changes, and what waits is then delivered
  intact (as TCP does over a route that comes back). What a peer behind a dead route
  sees.
- ``Reset()``: reset (RST: ``SO_LINGER`` 0, then close) every open connection, on
  both sides, and every new one as soon as it is accepted.
- ``Refuse()``: stop listening, so connects are refused, and reset the open
  connections (a target whose process died); the proxy listens again on the same port
  when the mode changes.

It counts connections and bytes (``stats``). It runs an asyncio loop in a background
thread of its own, so synchronous tests and tests with their own loop can both use it.

What it does not do: anything at the gRPC level (it sees bytes only), reorder or
corrupt bytes, or listen anywhere but loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

__all__ = [
    "Blackhole",
    "Delay",
    "FaultProxy",
    "Mode",
    "Pass",
    "ProxyStats",
    "Refuse",
    "Reset",
]

T = TypeVar("T")

#: Bytes read at once from either side.
CHUNK_BYTES: Final = 65536
#: Chunks held per direction before reading pauses (bounds memory under Delay).
QUEUE_CHUNKS: Final = 256
#: Seconds a call into the proxy's loop may take before the caller gives up.
CALL_TIMEOUT_S: Final = 10.0
_LOOPBACK: Final = frozenset({"127.0.0.1", "::1", "localhost"})


@dataclass(frozen=True, slots=True)
class Pass:
    """Forward bytes unchanged."""


@dataclass(frozen=True, slots=True)
class Delay:
    """Hold each chunk ``delay_s`` plus up to ``jitter_s`` seconds (uniform)."""

    delay_s: float
    jitter_s: float = 0.0

    def __post_init__(self) -> None:
        if self.delay_s < 0 or self.jitter_s < 0:
            raise ValueError("delay_s and jitter_s must be >= 0")


@dataclass(frozen=True, slots=True)
class Blackhole:
    """Accept and read, drop everything, never answer."""


@dataclass(frozen=True, slots=True)
class Reset:
    """Reset open and new connections."""


@dataclass(frozen=True, slots=True)
class Refuse:
    """Stop listening (connects are refused) and reset open connections."""


Mode = Pass | Delay | Blackhole | Reset | Refuse


@dataclass(frozen=True, slots=True)
class ProxyStats:
    """Counts since ``start``."""

    connections: int = 0
    """Connections accepted."""
    open_connections: int = 0
    resets: int = 0
    """Connections reset by the proxy."""
    bytes_to_target: int = 0
    bytes_from_target: int = 0
    dropped_bytes: int = 0
    """Bytes read from new connections and thrown away (Blackhole)."""


@dataclass(eq=False)
class _Connection:
    client: asyncio.StreamWriter
    handler: asyncio.Task[Any] | None = None
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close with RST: linger on, zero seconds, then abort."""
    if writer is None or writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """A loopback TCP proxy to ``target`` whose faults the test switches on and off."""

    def __init__(self, target: tuple[str, int]) -> None:
        host, _ = target
        if host not in _LOOPBACK:
            raise ValueError(f"the fault proxy forwards to loopback only, not {host!r}")
        self.target = target
        self.port = 0
        self._mode: Mode = Pass()
        self._lock = threading.Lock()
        self._stats = ProxyStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._random = random.Random()
        self._flowing = asyncio.Event()
        """Set unless the mode is Blackhole (established connections wait on it)."""
        self._flowing.set()

    # -- the test's side (any thread) ---------------------------------------------

    def start(self) -> int:
        """Start the loop thread and listen; the listening port on 127.0.0.1."""
        if self._thread is not None:
            raise RuntimeError("the proxy is already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name=f"fault-proxy-{self.target[1]}", daemon=True
        )
        self._thread.start()
        self._call(self._listen())
        return self.port

    def stop(self) -> None:
        """Reset every connection, stop listening and end the loop thread."""
        if self._loop is None or self._thread is None:
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=CALL_TIMEOUT_S)
        self._loop.close()
        self._loop = None
        self._thread = None

    def set_mode(self, mode: Mode) -> None:
        """Switch to ``mode``; returns once the proxy behaves that way."""
        self._call(self._switch(mode))

    @property
    def mode(self) -> Mode:
        with self._lock:
            return self._mode

    def stats(self) -> ProxyStats:
        with self._lock:
            return self._stats

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            coroutine.close()
            raise RuntimeError("the proxy is not started")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(timeout=CALL_TIMEOUT_S)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            current = self._stats
            changes = {name: getattr(current, name) + delta for name, delta in deltas.items()}
            self._stats = ProxyStats(**{**_as_dict(current), **changes})

    # -- the loop's side ------------------------------------------------------------

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _switch(self, mode: Mode) -> None:
        with self._lock:
            previous, self._mode = self._mode, mode
        if isinstance(mode, Blackhole):
            self._flowing.clear()
        else:
            self._flowing.set()
        if isinstance(mode, Reset | Refuse):
            self._reset_all()
        if isinstance(mode, Refuse):
            await self._stop_listening()
        elif isinstance(previous, Refuse):
            await self._listen()

    async def _shutdown(self) -> None:
        await self._stop_listening()
        self._reset_all()
        handlers = [conn.handler for conn in self._connections if conn.handler is not None]
        await asyncio.gather(*handlers, return_exceptions=True)

    def _reset_all(self) -> None:
        for conn in list(self._connections):
            self._reset_connection(conn)

    def _reset_connection(self, conn: _Connection) -> None:
        _reset(conn.client)
        _reset(conn.upstream)
        for task in conn.tasks:
            task.cancel()
        self._count(resets=1)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(client=writer, handler=asyncio.current_task())
        self._connections.add(conn)
        self._count(connections=1, open_connections=1)
        try:
            await self._serve(conn, reader)
        finally:
            for task in conn.tasks:
                task.cancel()
            self._connections.discard(conn)
            self._count(open_connections=-1)
            for side in (conn.client, conn.upstream):
                if side is not None:
                    side.transport.abort()

    async def _serve(self, conn: _Connection, reader: asyncio.StreamReader) -> None:
        mode = self.mode
        if isinstance(mode, Reset | Refuse):
            self._reset_connection(conn)
            return
        if isinstance(mode, Blackhole):
            await self._drain_into_nothing(reader)
            return
        try:
            up_reader, conn.upstream = await asyncio.open_connection(*self.target)
        except OSError:
            self._reset_connection(conn)
            return
        conn.tasks = [
            asyncio.create_task(self._pipe(reader, conn.upstream, to_target=True)),
            asyncio.create_task(self._pipe(up_reader, conn.client, to_target=False)),
        ]
        # Both directions until both end; a broken one ends the connection.
        await asyncio.wait(conn.tasks, return_when=asyncio.FIRST_EXCEPTION)

    async def _drain_into_nothing(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while chunk := await reader.read(CHUNK_BYTES):
                self._count(dropped_bytes=len(chunk))

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, to_target: bool
    ) -> None:
        """Copy one direction, delaying or dropping chunks as the mode says; raise when
        either end breaks."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(QUEUE_CHUNKS)
        parts = [
            asyncio.create_task(self._receive(reader, queue)),
            asyncio.create_task(self._send(queue, writer, to_target=to_target)),
        ]
        try:
            done, _ = await asyncio.wait(parts, return_when=asyncio.FIRST_EXCEPTION)
            for part in done:
                part.result()
        finally:
            for part in parts:
                part.cancel()
            await asyncio.gather(*parts, return_exceptions=True)

    async def _receive(
        self, reader: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes] | None]
    ) -> None:
        last_release = 0.0
        while chunk := await reader.read(CHUNK_BYTES):
            await self._flowing.wait()  # a blackhole stalls established connections
            mode = self.mode
            release = time.monotonic()
            if isinstance(mode, Delay):
                release += mode.delay_s + self._random.uniform(0.0, mode.jitter_s)
            last_release = max(release, last_release)
            await queue.put((last_release, chunk))
        await queue.put(None)

    async def _send(
        self,
        queue: asyncio.Queue[tuple[float, bytes] | None],
        writer: asyncio.StreamWriter,
        *,
        to_target: bool,
    ) -> None:
        while (item := await queue.get()) is not None:
            release, chunk = item
            wait_s = release - time.monotonic()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            await self._flowing.wait()
            writer.write(chunk)
            await writer.drain()
            if to_target:
                self._count(bytes_to_target=len(chunk))
            else:
                self._count(bytes_from_target=len(chunk))
        if writer.can_write_eof():
            writer.write_eof()


def _as_dict(stats: ProxyStats) -> dict[str, int]:
    return {name: getattr(stats, name) for name in ProxyStats.__slots__}
