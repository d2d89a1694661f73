"""A small FleetService client for the commands: channel, deadlines, TLS, errors.

``FleetClient`` opens one channel to the Manager that ``connection.py`` resolves
(``--manager``, ``RECONCILER_MANAGER``, the client file, the default), with mutual
TLS when ``--tls-ca/--tls-cert/--tls-key`` are given and an insecure loopback channel
otherwise. Every unary call carries ``timeout_s`` as its deadline; streams that
follow events run until the command stops them.

``run`` runs a command's coroutine and turns a failed RPC into one clean line naming
the gRPC status, e.g. ``UNAVAILABLE: cannot reach the Manager at 127.0.0.1:7060 ...``.
``recent_events`` reads the stored events
that match a filter (WatchEvents replays them first and says how many).

``DaemonClient`` is the same for one daemon (``--daemon ADDR``), with the same TLS
flags.

Tracing: both clients set tracing up from the standard ``OTEL_*`` variables (the
settings' defaults say none, so by default the CLI makes no spans and adds no
interceptors). With ``OTEL_TRACES_EXPORTER=otlp`` every call is a client span that
carries its trace context to the server, so an ``apply`` starts the trace that the
Manager and the daemons continue; leaving ``async with`` exports what is left, waiting
at most ``TRACE_FLUSH_S``.

What it does not do: print (``output.py`` and the commands do).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine, Mapping
from types import TracebackType
from typing import Any, Final, TypeVar

import grpc

from reconciler import __version__, telemetry, tls
from reconciler.api.agent.v1 import event_pb2
from reconciler.api.daemon.v1 import daemon_pb2_grpc
from reconciler.api.fleet.v1 import fleet_pb2, fleet_pb2_grpc
from reconciler.cli.connection import ManagerConnection, resolve_manager_address
from reconciler.cli.options import CliError
from reconciler.config import TelemetrySettings
from reconciler.convert import timestamp
from reconciler.manager.fleet import REPLAY_COUNT_KEY
from reconciler.rpc import channel_options

__all__ = [
    "CLI_SERVICE_NAME",
    "DEFAULT_TIMEOUT_S",
    "TRACE_FLUSH_S",
    "DaemonClient",
    "FleetClient",
    "recent_events",
    "rpc_error_line",
    "run",
]

T = TypeVar("T")

#: Deadline of each unary call, in seconds.
DEFAULT_TIMEOUT_S: Final = 10.0
#: A replay of stored events is over when nothing arrives for this long.
_REPLAY_IDLE_S: Final = 0.5
#: ``service.name`` of the CLI's spans.
CLI_SERVICE_NAME: Final = "reconciler-cli"
#: At most this long, on exit, to export the CLI's spans (a missing collector must
#: not hold the command up).
TRACE_FLUSH_S: Final = 3.0


def _open_tracing(env: Mapping[str, str]) -> telemetry.Tracing:
    """Tracing as the ``OTEL_*`` variables ask (none without them)."""
    return telemetry.setup_tracing(
        TelemetrySettings(),
        service_name=CLI_SERVICE_NAME,
        version=__version__,
        environ=env,
        install_global=False,
    )


async def _close_tracing(tracing: telemetry.Tracing) -> None:
    if tracing.enabled:
        await asyncio.to_thread(tracing.shutdown, TRACE_FLUSH_S)


def rpc_error_line(error: grpc.aio.AioRpcError, *, address: str, peer: str = "the Manager") -> str:
    """One line for a failed call: the status name, the details, and where."""
    code = error.code()
    name = code.name if code is not None else "UNKNOWN"
    details = " ".join((error.details() or "").split())
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return f"{name}: cannot reach {peer} at {address}: {details}"
    return f"{name}: {details}"


class _Client:
    """One channel to ``address`` with the CLI's TLS flags, tracing from ``OTEL_*``,
    and a stub made by ``_open`` (inside ``async with``)."""

    def __init__(
        self,
        address: str,
        connection: ManagerConnection,
        *,
        timeout_s: float,
        env: Mapping[str, str],
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._tls = tls.settings_from_files(
            connection.tls.ca_file, connection.tls.cert_file, connection.tls.key_file
        )
        self._env = env
        self._tracing = telemetry.Tracing.disabled()
        self._channel: grpc.aio.Channel | None = None

    async def _connect(self) -> grpc.aio.Channel:
        self._tracing = _open_tracing(self._env)
        self._channel = tls.secure_channel(
            self.address,
            self._tls,
            options=channel_options(),
            interceptors=telemetry.client_interceptors(self._tracing),
        )
        return self._channel

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        await _close_tracing(self._tracing)


class FleetClient(_Client):
    """One channel to the Manager and a FleetService stub on it."""

    def __init__(
        self,
        connection: ManagerConnection,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        env: Mapping[str, str] = os.environ,
    ) -> None:
        address = resolve_manager_address(connection.manager, env=env).address
        super().__init__(address, connection, timeout_s=timeout_s, env=env)
        self._fleet: fleet_pb2_grpc.FleetServiceAsyncStub | None = None

    async def __aenter__(self) -> FleetClient:
        self._fleet = fleet_pb2_grpc.FleetServiceStub(await self._connect())
        return self

    @property
    def fleet(self) -> fleet_pb2_grpc.FleetServiceAsyncStub:
        """The FleetService stub (inside ``async with``)."""
        if self._fleet is None:
            raise RuntimeError("use FleetClient in `async with`")
        return self._fleet


class DaemonClient(_Client):
    """One channel to a daemon (``--daemon ADDR``: host:port or unix:PATH) and a
    DaemonService stub on it, with the same TLS flags as the Manager's."""

    def __init__(
        self,
        address: str,
        connection: ManagerConnection,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        env: Mapping[str, str] = os.environ,
    ) -> None:
        super().__init__(address, connection, timeout_s=timeout_s, env=env)
        self._daemon: daemon_pb2_grpc.DaemonServiceAsyncStub | None = None

    async def __aenter__(self) -> DaemonClient:
        self._daemon = daemon_pb2_grpc.DaemonServiceStub(await self._connect())
        return self

    @property
    def daemon(self) -> daemon_pb2_grpc.DaemonServiceAsyncStub:
        """The DaemonService stub (inside ``async with``)."""
        if self._daemon is None:
            raise RuntimeError("use DaemonClient in `async with`")
        return self._daemon


def run(coroutine: Coroutine[Any, Any, T], *, address: str = "", peer: str = "the Manager") -> T:
    """Run a command's coroutine; a failed RPC becomes a one-line ``CliError``."""
    try:
        return asyncio.run(coroutine)
    except grpc.aio.AioRpcError as error:
        raise CliError(rpc_error_line(error, address=address, peer=peer)) from None


async def recent_events(
    client: FleetClient,
    *,
    node_id: str = "",
    agent_id: str = "",
    limit: int = 0,
) -> list[event_pb2.Event]:
    """The stored events matching the filter, oldest first (the last ``limit`` only,
    when it is set). WatchEvents replays them first and says how many in its initial
    metadata; without that header the replay counts as over when the stream goes
    quiet."""
    request = fleet_pb2.WatchEventsRequest(node_id=node_id, agent_id=agent_id, since=timestamp(0))
    call = client.fleet.WatchEvents(request, timeout=client.timeout_s)
    try:
        metadata = await call.initial_metadata()
        count = _replay_count(metadata)
        events = await (_read(call, count) if count is not None else _read_until_quiet(call))
    finally:
        call.cancel()
        await call.code()  # let the cancellation finish on this event loop
    return events[-limit:] if limit else events


def _replay_count(metadata: Any) -> int | None:
    for key, value in metadata or ():
        if key == REPLAY_COUNT_KEY:
            return int(value)
    return None


async def _read(call: Any, count: int) -> list[event_pb2.Event]:
    events: list[event_pb2.Event] = []
    while len(events) < count:
        event = await call.read()
        if not isinstance(event, event_pb2.Event):
            break  # the end of the stream
        events.append(event)
    return events


async def _read_until_quiet(call: Any) -> list[event_pb2.Event]:
    events: list[event_pb2.Event] = []
    while True:
        try:
            event = await asyncio.wait_for(call.read(), _REPLAY_IDLE_S)
        except TimeoutError:
            return events
        if not isinstance(event, event_pb2.Event):
            return events
        events.append(event)
