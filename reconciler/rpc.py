"""gRPC plumbing shared by the daemon's and the Manager's servers and clients.

- ``ERROR_CODES`` is the one table that maps the model's errors to gRPC status codes;
  ``ErrorInterceptor`` applies it to every RPC, so servicers raise model errors and
  never build statuses themselves. An unexpected exception becomes INTERNAL with a
  message, is logged once, and the server keeps serving. A request that cannot be
  decoded (nested too deep, malformed) is answered INVALID_ARGUMENT, not UNKNOWN.
- ``is_retryable`` says which failures are worth retrying (UNAVAILABLE,
  DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED): the daemon's Manager link and the Manager's
  pushes both retry by it.
- ``server_options`` / ``channel_options`` bound message sizes and set keepalive so a
  dead peer is noticed within a minute, with the server's enforcement policy matching
  what clients send; clients redial a peer that comes back within seconds.
- ``add_standard_services`` serves ``grpc.health.v1`` and server reflection.

Tracing and metrics interceptors are added by ``reconciler.telemetry``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Final

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from reconciler.model.errors import (
    Conflict,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ReconcilerError,
    StaleGeneration,
    TemporaryError,
    Unavailable,
)

__all__ = [
    "ERROR_CODES",
    "RETRYABLE_CODES",
    "ErrorInterceptor",
    "WrappingInterceptor",
    "add_standard_services",
    "channel_options",
    "is_retryable",
    "server_options",
    "status_for",
]

log = logging.getLogger(__name__)

#: Model error -> gRPC status code. The first matching class wins (most specific first).
ERROR_CODES: tuple[tuple[type[ReconcilerError], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (StaleGeneration, grpc.StatusCode.FAILED_PRECONDITION),
    (Conflict, grpc.StatusCode.FAILED_PRECONDITION),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (TemporaryError, grpc.StatusCode.UNAVAILABLE),
    (ReconcilerError, grpc.StatusCode.INTERNAL),
)

#: The failures worth another attempt: the peer or the path to it is away or busy.
#: Every other status is a real answer and is not retried.
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


def is_retryable(error: BaseException) -> bool:
    """True for a failed call (or a model ``Unavailable``) worth retrying."""
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code() in RETRYABLE_CODES
    return isinstance(error, Unavailable)


#: Keepalive: clients ping every 20 s without traffic and give up after 10 s without an
#: answer, so a dead connection is noticed within 30 s; servers allow pings that often.
KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000
#: Cap of a channel's reconnect backoff. gRPC's own cap is 120 s: after a minute of
#: refused connects a channel waits ~40 s before it dials again, and every call made
#: meanwhile fails at once, so a daemon would find a restarted Manager (or the Manager
#: a restarted daemon) only that late. 5 s keeps the return within seconds.
MAX_RECONNECT_BACKOFF_MS = 5_000


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message an error is answered with."""
    for kind, code in ERROR_CODES:
        if isinstance(error, kind):
            return code, str(error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"


def server_options(*, max_message_bytes: int, max_connection_age_s: float = 0.0) -> list[Any]:
    """Channel arguments for a server: bounded messages and a keepalive policy."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_ping_strikes", 5),
    ]
    if max_connection_age_s > 0:
        options.append(("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)))
    return options


def channel_options(*, max_message_bytes: int = 4 * 1024 * 1024) -> list[Any]:
    """Channel arguments for a client: keepalive matching ``server_options``."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
        ("grpc.enable_retries", 0),
    ]


def add_standard_services(
    server: grpc.aio.Server, service_names: Iterable[str]
) -> health.aio.HealthServicer:
    """Serve the health service and reflection; return the health servicer."""
    names = list(service_names)
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    return servicer


async def set_serving(
    servicer: health.aio.HealthServicer, service_names: Sequence[str], *, serving: bool
) -> None:
    """Mark the server and each service SERVING or NOT_SERVING."""
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ["", *service_names]:
        await servicer.set(name, status)


Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Context], Awaitable[Any]]
StreamHandler = Callable[[Any, Context], AsyncIterator[Any]]


class _Undecodable:
    """Stands in for a request the deserializer refused; the behaviour answers it."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserialize``, returning ``_Undecodable`` instead of raising: gRPC would answer
    an exception there with UNKNOWN and the library's message."""
    if deserialize is None:
        return None

    def tolerant(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as error:
            return _Undecodable(str(error)[:200])

    return tolerant


def _check_decoded(request: Any) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidArgument("request", f"cannot be decoded: {request.problem}")


#: Wrapped method handlers kept per interceptor (a server has a few dozen methods; the
#: bound keeps unknown names from a hostile client from growing it).
_MAX_WRAPPED_METHODS: Final = 1000


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that wraps each method's handler once.

    A server hands out the same handler object for a method on every call, so the
    wrapped handler ``wrap`` builds is kept per method and handed out again while the
    handler it wraps is the same object; building it per call cost an RPC a few
    percent of its throughput.
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    def wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """``handler`` with this interceptor's work around it (or ``handler`` itself)."""
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.wrap(method, handler)
        if len(self._wrapped) < _MAX_WRAPPED_METHODS:
            self._wrapped[method] = (handler, wrapped)
        return wrapped


class ErrorInterceptor(WrappingInterceptor):
    """Answers model errors with their mapped status; unexpected ones with INTERNAL."""

    def __init__(self, *, on_error: Callable[[str, grpc.StatusCode], None] | None = None) -> None:
        super().__init__()
        self._on_error = on_error

    def wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, handler.unary_unary),  # type: ignore[arg-type]
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(method, handler.unary_stream),  # type: ignore[arg-type]
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler

    def _wrap_unary(self, method: str, behaviour: Handler) -> Handler:
        async def call(request: Any, context: Context) -> Any:
            try:
                _check_decoded(request)
                return await behaviour(request, context)
            except ReconcilerError as error:
                await self._abort(method, context, error)
            except grpc.aio.AbortError:
                raise
            except grpc.aio.AioRpcError as error:
                await self._relay(method, context, error)
            except Exception as error:
                log.exception("unexpected error in %s", method)
                await self._abort(method, context, error)

        return call

    def _wrap_stream(self, method: str, behaviour: StreamHandler) -> StreamHandler:
        async def call(request: Any, context: Context) -> AsyncIterator[Any]:
            try:
                _check_decoded(request)
                async for item in behaviour(request, context):
                    yield item
            except ReconcilerError as error:
                await self._abort(method, context, error)
            except grpc.aio.AbortError:
                raise
            except grpc.aio.AioRpcError as error:
                await self._relay(method, context, error)
            except Exception as error:
                log.exception("unexpected error in %s", method)
                await self._abort(method, context, error)

        return call

    async def _abort(self, method: str, context: Context, error: BaseException) -> None:
        code, message = status_for(error)
        if self._on_error is not None:
            self._on_error(method, code)
        await context.abort(code, message)

    async def _relay(self, method: str, context: Context, error: grpc.aio.AioRpcError) -> None:
        """A call this RPC made failed: answer with the same code, saying where."""
        code = error.code()
        if self._on_error is not None:
            self._on_error(method, code)
        await context.abort(code, f"upstream call failed: {error.details()}")
