"""Getting one heartbeat to the daemon: over its Unix socket or its HTTP endpoint.

What: the ``Transport`` Protocol and two real transports.

- ``UnixSocketTransport`` keeps one connection open and writes one JSON object per line.
  The daemon answers nothing on success; on a bad line it writes one error line and
  closes. A reader task watches the connection: an error line or EOF marks it broken,
  reports the rejection through ``on_rejected`` at once, and the next ``send``
  reconnects.
- ``HttpTransport`` POSTs each heartbeat with ``Authorization: Bearer <token>`` on a
  keep-alive aiohttp session (imported only when used).
- ``SocketOrHttpTransport`` uses the socket, and HTTP from the first time the socket
  refuses this process for good (EACCES: an agent that runs as another user than the
  daemon, outside the socket's group, may not connect to it).

Errors (``send`` raises only these)::

    TransportError              temporary: retry after a backoff
    ├── ReceiverUnavailable     cannot connect / connection lost / timed out
    │   └── ReceiverForbidden   the socket refuses this process (permission denied)
    └── HeartbeatRejected       the daemon answered with an error (reason, field)
        └── ReceiverBusy        HTTP 429, with the server's Retry-After

What not: no retry policy and no scheduling (``agentlet.heartbeater`` owns both).
``FakeTransport`` is the fake for unit tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from agentlet.heartbeat import MAX_FRAME_BYTES, Heartbeat, encode_heartbeat, encode_line

if TYPE_CHECKING:
    import aiohttp

__all__ = [
    "FakeTransport",
    "HeartbeatRejected",
    "HttpTransport",
    "ReceiverBusy",
    "ReceiverForbidden",
    "ReceiverUnavailable",
    "SocketOrHttpTransport",
    "Transport",
    "TransportError",
    "UnixSocketTransport",
]

_MAX_ERROR_BODY_BYTES = 4096
log = logging.getLogger(__name__)


class TransportError(Exception):
    """A heartbeat was not delivered; always worth retrying after a backoff."""


class ReceiverUnavailable(TransportError):
    """The daemon's receiver could not be reached, or the connection broke."""


class ReceiverForbidden(ReceiverUnavailable):
    """The Unix socket refuses this process (permission denied): it will not change."""


class HeartbeatRejected(TransportError):
    """The daemon refused a heartbeat: ``reason`` is its stable word, ``field`` the field."""

    def __init__(self, reason: str, field: str | None = None, *, status: int | None = None):
        where = f" (field {field})" if field else ""
        super().__init__(f"daemon rejected the heartbeat: {reason}{where}")
        self.reason = reason
        self.field = field
        self.status = status


class ReceiverBusy(HeartbeatRejected):
    """HTTP 429: the receiver's queue is full; wait ``retry_after_s`` at least."""

    def __init__(self, retry_after_s: float | None) -> None:
        super().__init__("busy", status=429)
        self.retry_after_s = retry_after_s


class Transport(Protocol):
    """Delivers heartbeats; ``send`` raises only ``TransportError``."""

    async def send(self, heartbeat: Heartbeat) -> None:
        """Deliver one heartbeat (for the socket: written and flushed)."""
        ...

    async def close(self) -> None:
        """Release connections; safe to call twice."""
        ...


RejectionHandler = Callable[[HeartbeatRejected], None]


class UnixSocketTransport:
    """One persistent connection to the daemon's Unix socket, newline-delimited JSON."""

    def __init__(
        self,
        path: str,
        *,
        timeout_s: float,
        send_token: bool = True,
        on_rejected: RejectionHandler | None = None,
    ) -> None:
        self._path = path
        self._timeout_s = timeout_s
        self._send_token = send_token
        self.on_rejected = on_rejected
        """Told at once when the daemon writes an error line back."""
        self._writer: asyncio.StreamWriter | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.connections_opened = 0

    @property
    def connected(self) -> bool:
        """True while a connection is open and not known to be broken."""
        return self._writer is not None

    async def send(self, heartbeat: Heartbeat) -> None:
        line = encode_line(heartbeat, include_token=self._send_token)
        writer = self._writer if self._writer is not None else await self._connect()
        try:
            writer.write(line)
            await asyncio.wait_for(writer.drain(), self._timeout_s)
        except (OSError, TimeoutError) as exc:
            await self.close()
            raise ReceiverUnavailable(f"writing to {self._path} failed: {exc!r}") from None

    async def _connect(self) -> asyncio.StreamWriter:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self._path, limit=MAX_FRAME_BYTES), self._timeout_s
            )
        except PermissionError as exc:
            raise ReceiverForbidden(f"cannot connect to {self._path}: {exc!r}") from None
        except (OSError, TimeoutError) as exc:
            raise ReceiverUnavailable(f"cannot connect to {self._path}: {exc!r}") from None
        self._writer = writer
        self.connections_opened += 1
        self._watcher = asyncio.create_task(self._watch(reader, writer))
        return writer

    async def _watch(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Wait for whatever the daemon writes back: an error line, or EOF."""
        try:
            line = await reader.readline()
        except (OSError, ValueError, asyncio.LimitOverrunError):
            line = b""
        if self._writer is writer:
            self._writer = None
        writer.close()
        if line and self.on_rejected is not None:
            self.on_rejected(_parse_error_line(line))

    async def close(self) -> None:
        writer, watcher = self._writer, self._watcher
        self._writer = None
        self._watcher = None
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), self._timeout_s)


class SocketOrHttpTransport:
    """The Unix socket while it lets this process in, then HTTP for good."""

    def __init__(self, socket: UnixSocketTransport, http: HttpTransport) -> None:
        self.socket = socket
        self.http = http
        self.using_http = False

    async def send(self, heartbeat: Heartbeat) -> None:
        if not self.using_http:
            try:
                await self.socket.send(heartbeat)
                return
            except ReceiverForbidden as exc:
                log.warning("%s; sending heartbeats over HTTP from now on", exc)
                self.using_http = True
                await self.socket.close()
        await self.http.send(heartbeat)

    async def close(self) -> None:
        await self.socket.close()
        await self.http.close()


def _parse_error_line(line: bytes) -> HeartbeatRejected:
    """Read ``{"error": ..., "field": ...}``; anything else is reported as it came."""
    try:
        body = json.loads(line[:_MAX_ERROR_BODY_BYTES])
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("error"), str):
        return HeartbeatRejected("unreadable_answer")
    field = body.get("field")
    return HeartbeatRejected(body["error"][:64], field[:64] if isinstance(field, str) else None)


class HttpTransport:
    """POST /heartbeat with a bearer token on one keep-alive session."""

    def __init__(self, url: str, *, token: str, timeout_s: float) -> None:
        self._url = url
        self._token = token
        self._timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def send(self, heartbeat: Heartbeat) -> None:
        import aiohttp  # costly to import (~170 ms): only HTTP agents pay for it

        body = encode_heartbeat(heartbeat, include_token=False)
        headers = {"Authorization": f"Bearer {self._token}", "Content-Type": "application/json"}
        try:
            session = self._session_for(aiohttp)
            async with session.post(self._url, data=body, headers=headers) as response:
                if response.status == 202:
                    return
                raise await _rejection_from(response)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise ReceiverUnavailable(f"POST {self._url} failed: {exc!r}") from None

    def _session_for(self, aiohttp: Any) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(total=self._timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _rejection_from(response: aiohttp.ClientResponse) -> HeartbeatRejected:
    if response.status == 429:
        return ReceiverBusy(_retry_after(response.headers.get("Retry-After")))
    raw = await response.content.read(_MAX_ERROR_BODY_BYTES)
    parsed = _parse_error_line(raw)
    reason = parsed.reason if parsed.reason != "unreadable_answer" else f"http_{response.status}"
    return HeartbeatRejected(reason, parsed.field, status=response.status)


def _retry_after(text: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is ignored), bounded to an hour."""
    if text is None or not text.strip().isdigit():
        return None
    return min(float(text.strip()), 3600.0)


class FakeTransport:
    """Records heartbeats; raise from ``send`` by setting ``fail_with``."""

    def __init__(self) -> None:
        self.sent: list[Heartbeat] = []
        self.fail_with: TransportError | None = None
        self.closed = False
        self.delivered = asyncio.Event()

    async def send(self, heartbeat: Heartbeat) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.sent.append(heartbeat)
        self.delivered.set()

    async def close(self) -> None:
        self.closed = True
