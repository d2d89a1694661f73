"""Mutual TLS between the Manager, the daemons and the CLI: files, credentials, identity.

- **Files.** ``load_tls_material`` reads the CA, certificate and key named by
  ``TlsSettings`` with a bounded read, checks they are PEM of the right kind and that
  the key belongs to the certificate, and refuses a key file others may read (see
  ``key_file_problem``). Every failure is a ``TlsFileError`` (a ``ConfigError``)
  naming the setting and the file; the daemon and the Manager meet it at start.
- **Credentials.** ``server_credentials`` requires and verifies client certificates
  from the configured CA; ``channel_credentials`` verifies the server against the CA
  and presents our own certificate. ``add_listen_port`` and ``secure_channel`` apply
  them, or, with ``tls.mode: insecure``, bind and dial loopback only and warn.
- **Identity.** Each certificate names its holder in a URI subject alternative name::

      reconciler://node/<node-id>     a daemon; it may speak for that node only
      reconciler://node/*             a daemon certificate shared by many nodes (a
                                      Kubernetes Secret mounted by a DaemonSet): it may
                                      speak for any node, so no node id is bound
      reconciler://manager            the Manager (server and client)
      reconciler://operator/<name>    a person or tool using the CLI

  A certificate without such a URI is read by its subject common name: a valid node
  id names a node (so certificates from an existing CA keep working, one per node);
  the words ``manager`` and ``operator`` are reserved and give no role that way.
  ``peer_identity_of`` reads the verified peer certificate from the call's auth
  context; ``require_node`` refuses a mutating RPC that names another node than the
  caller's certificate, ``require_role`` one from a caller without an allowed role, and
  ``RoleInterceptor`` applies ``require_role`` to a whole server (the daemon accepts
  only the Manager and operators). Calls arriving on a Unix socket carry no
  certificate: they count as local operators, guarded by the socket's file mode.
- **Development PKI** lives in ``reconciler.pki`` (``reconciler certs init``), so
  running processes never load a certificate toolkit.

What this module does not do: decide which RPCs mutate (servicers call
``require_node``), rotate certificates, or check revocation. Operators read
``docs/security.md``.
"""

from __future__ import annotations

import enum
import logging
import os
import ssl
import stat
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import grpc

from reconciler.config import ConfigError, TlsMode, TlsSettings, is_loopback_host, parse_host_port
from reconciler.model.errors import PermissionDenied
from reconciler.model.ids import is_valid_node_id
from reconciler.rpc import WrappingInterceptor, channel_options

__all__ = [
    "ANY_NODE",
    "MAX_PEM_BYTES",
    "URI_SCHEME",
    "PeerIdentity",
    "PeerRole",
    "RoleInterceptor",
    "TlsFileError",
    "TlsMaterial",
    "add_listen_port",
    "channel_credentials",
    "identity_from_names",
    "identity_uri",
    "insecure_loopback_channel",
    "key_file_problem",
    "load_tls_material",
    "peer_identity",
    "peer_identity_of",
    "require_node",
    "require_role",
    "secure_channel",
    "server_credentials",
    "settings_from_files",
]

log = logging.getLogger(__name__)

#: The largest CA, certificate or key file read (a chain of a few certificates is ~4 KiB).
MAX_PEM_BYTES: Final = 1024 * 1024
#: The URI scheme of identity subject alternative names.
URI_SCHEME: Final = "reconciler"
#: The node name of a certificate that may speak for any node.
ANY_NODE: Final = "*"

_UNIX_PEER_PREFIXES: Final = ("unix:", "unix-abstract:")


class TlsFileError(ConfigError):
    """A TLS file is missing, unreadable, too large, not PEM, or too open."""

    def __init__(self, setting: str, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}", origin=setting, file=path)
        self.setting = setting
        self.path = path


class PeerRole(enum.StrEnum):
    """What a certificate's holder is."""

    NODE = "node"
    MANAGER = "manager"
    OPERATOR = "operator"


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Who is on the other end of a call.

    ``name`` is the node id for ``NODE`` (``ANY_NODE`` for a shared daemon
    certificate), the operator's name for ``OPERATOR`` and ``manager`` for ``MANAGER``.
    ``local`` is True for a call on a Unix socket, which carries no certificate.
    """

    role: PeerRole
    name: str
    local: bool = False


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """The PEM bytes of a CA, a certificate chain and its private key, checked."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes


# ------------------------------------------------------------------------------- files


def key_file_problem(mode: int, *, owner_uid: int, euid: int) -> str | None:
    """Why a key file with these permission bits and owner is refused, or None.

    The rule is PostgreSQL's: a key we own must be 0600 or stricter; a key owned by
    root may also be group-readable (0640, 0440), which is how Kubernetes mounts a
    Secret with ``defaultMode: 0440`` and ``fsGroup``. Others never get any access.
    """
    bits = stat.S_IMODE(mode)
    if bits & 0o007:
        return f"accessible by others (mode {bits:04o}); run chmod 600 on it"
    if owner_uid == 0 and owner_uid != euid:
        if bits & 0o030:
            return f"group-writable (mode {bits:04o}); run chmod 640 on it"
        return None
    if bits & 0o070:
        return f"accessible by its group (mode {bits:04o}); run chmod 600 on it"
    return None


def _read_bounded(setting: str, path: str, *, private: bool) -> bytes:
    """Read a regular file of at most MAX_PEM_BYTES (following symlinks)."""
    if not path:
        raise TlsFileError(setting, "<empty>", "no file given (tls.mode mtls needs it)")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise TlsFileError(setting, path, "no such file") from None
    except OSError as exc:
        raise TlsFileError(setting, path, f"cannot open: {exc.strerror}") from None
    try:
        _check_opened(setting, path, os.fstat(fd), private=private)
        data = _read_fd(fd, MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise TlsFileError(setting, path, f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_PEM_BYTES:
        raise TlsFileError(setting, path, f"larger than {MAX_PEM_BYTES} bytes")
    return data


def _check_opened(setting: str, path: str, info: os.stat_result, *, private: bool) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise TlsFileError(setting, path, "not a regular file")
    if info.st_size > MAX_PEM_BYTES:
        raise TlsFileError(setting, path, f"larger than {MAX_PEM_BYTES} bytes")
    if private:
        problem = key_file_problem(info.st_mode, owner_uid=info.st_uid, euid=os.geteuid())
        if problem is not None:
            raise TlsFileError(setting, path, f"private key file is {problem}")


def _read_fd(fd: int, limit_bytes: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit_bytes:
        chunk = os.read(fd, limit_bytes - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _check_certificates(setting: str, path: str, data: bytes) -> None:
    """PEM certificates, as the TLS library itself will read them."""
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise TlsFileError(setting, path, "not a PEM certificate")
    try:
        ssl.create_default_context(cadata=data.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError):
        raise TlsFileError(setting, path, "not a PEM certificate") from None


def _check_key_pair(tls: TlsSettings, key_pem: bytes) -> None:
    """The key is a PEM private key, unencrypted, and belongs to the certificate."""
    if b"ENCRYPTED" in key_pem:
        raise TlsFileError("tls.key_file", tls.key_file, "encrypted private keys are not supported")
    if b"PRIVATE KEY-----" not in key_pem:
        raise TlsFileError("tls.key_file", tls.key_file, "not a PEM private key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file, password=_no_password)
    except ssl.SSLError as error:
        if "KEY_VALUES_MISMATCH" in str(error):
            problem = f"this key does not belong to the certificate in {tls.cert_file}"
        else:
            problem = f"not a usable PEM private key ({error.reason or error})"
        raise TlsFileError("tls.key_file", tls.key_file, problem) from None


def _no_password() -> str:
    raise TlsFileError("tls.key_file", "", "encrypted private keys are not supported")


def load_tls_material(tls: TlsSettings) -> TlsMaterial:
    """Read and check the three files of ``tls``; TlsFileError naming the bad one.

    The checks use the standard library's TLS (the same OpenSSL gRPC's checks
    resemble), so a daemon or Manager loads no certificate toolkit to start.
    """
    ca_pem = _read_bounded("tls.ca_file", tls.ca_file, private=False)
    _check_certificates("tls.ca_file", tls.ca_file, ca_pem)
    cert_pem = _read_bounded("tls.cert_file", tls.cert_file, private=False)
    _check_certificates("tls.cert_file", tls.cert_file, cert_pem)
    key_pem = _read_bounded("tls.key_file", tls.key_file, private=True)
    _check_key_pair(tls, key_pem)
    return TlsMaterial(ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pem)


def settings_from_files(
    ca_file: str | None, cert_file: str | None, key_file: str | None
) -> TlsSettings:
    """TlsSettings from the CLI's ``--tls-ca/--tls-cert/--tls-key``: none given is
    insecure, all three is mtls, anything else a ConfigError naming what is missing."""
    given = {"--tls-ca": ca_file, "--tls-cert": cert_file, "--tls-key": key_file}
    if not any(given.values()):
        return TlsSettings()
    missing = [flag for flag, value in given.items() if not value]
    if missing:
        raise ConfigError(f"mutual TLS also needs {', '.join(missing)}", origin="command line")
    return TlsSettings(
        mode=TlsMode.MTLS, ca_file=ca_file or "", cert_file=cert_file or "", key_file=key_file or ""
    )


# ------------------------------------------------------------------------- credentials


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials | None:
    """Credentials that require a client certificate from the CA; None when insecure."""
    if tls.mode is TlsMode.INSECURE:
        return None
    material = load_tls_material(tls)
    return grpc.ssl_server_credentials(
        [(material.key_pem, material.cert_pem)],
        root_certificates=material.ca_pem,
        require_client_auth=True,
    )


def channel_credentials(tls: TlsSettings) -> grpc.ChannelCredentials | None:
    """Credentials that verify the server against the CA and present our certificate;
    None when insecure."""
    if tls.mode is TlsMode.INSECURE:
        return None
    material = load_tls_material(tls)
    return grpc.ssl_channel_credentials(
        root_certificates=material.ca_pem,
        private_key=material.key_pem,
        certificate_chain=material.cert_pem,
    )


def _is_unix_target(address: str) -> bool:
    return address.startswith(_UNIX_PEER_PREFIXES)


def _require_loopback(address: str, *, what: str) -> None:
    if _is_unix_target(address):
        return
    try:
        host, _ = parse_host_port(address)
    except ValueError as exc:
        hint = f"; a Unix socket is written unix:{address}" if address.startswith("/") else ""
        raise ConfigError(f"{exc}{hint}", origin=what) from None
    if not is_loopback_host(host):
        problem = f"{host} is not a loopback address; tls.mode insecure is for loopback only"
        raise ConfigError(problem, origin=what)


def add_listen_port(server: grpc.aio.Server, address: str, tls: TlsSettings) -> int:
    """Bind ``address`` with mTLS, or (insecure mode) on loopback only with a warning.

    Returns the bound port (useful with port 0). A ``unix:`` address is always bound
    without TLS: the socket's file mode is its guard. Raises TlsFileError or
    ConfigError before binding when the files or the address are refused.
    """
    credentials = None if _is_unix_target(address) else server_credentials(tls)
    if credentials is not None:
        return server.add_secure_port(address, credentials)
    _require_loopback(address, what="grpc.listen")
    if not _is_unix_target(address):
        log.warning("gRPC on %s is plaintext (tls.mode insecure): for development only", address)
    return server.add_insecure_port(address)


def insecure_loopback_channel(
    address: str,
    *,
    options: Sequence[tuple[str, Any]] | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """A plaintext channel to a loopback or ``unix:`` address; ConfigError otherwise."""
    _require_loopback(address, what="insecure channel")
    return grpc.aio.insecure_channel(
        address, options=_options(options), interceptors=list(interceptors)
    )


def secure_channel(
    address: str,
    tls: TlsSettings,
    *,
    server_name: str | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """A channel to ``address`` as ``tls`` says: mTLS, or insecure to loopback only.

    ``server_name`` checks the server's certificate for that name instead of the
    host in ``address`` (the Manager dials a node by its id: node certificates carry
    the node id as a DNS name). ``options`` default to ``rpc.channel_options()``;
    ``interceptors`` (tracing, metrics) wrap every call on the channel.
    """
    credentials = channel_credentials(tls)
    if credentials is None:
        return insecure_loopback_channel(address, options=options, interceptors=interceptors)
    merged = _options(options)
    if server_name:
        merged.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(
        address, credentials, options=merged, interceptors=list(interceptors)
    )


def _options(options: Sequence[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
    return list(channel_options() if options is None else options)


# ---------------------------------------------------------------------------- identity


def identity_uri(role: PeerRole, name: str = "") -> str:
    """The URI SAN naming a holder, e.g. ``reconciler://node/node-1``."""
    if role is PeerRole.MANAGER:
        return f"{URI_SCHEME}://manager"
    return f"{URI_SCHEME}://{role.value}/{name}"


def _from_uri(uri: str) -> PeerIdentity | None:
    prefix = f"{URI_SCHEME}://"
    if not uri.startswith(prefix):
        return None
    role_text, _, name = uri[len(prefix) :].partition("/")
    if role_text == PeerRole.MANAGER and not name:
        return PeerIdentity(PeerRole.MANAGER, PeerRole.MANAGER.value)
    if role_text == PeerRole.NODE and (name == ANY_NODE or is_valid_node_id(name)):
        return PeerIdentity(PeerRole.NODE, name)
    if role_text == PeerRole.OPERATOR and is_valid_node_id(name):
        return PeerIdentity(PeerRole.OPERATOR, name)
    return None


def identity_from_names(
    *, common_names: Sequence[str], alt_names: Sequence[str]
) -> PeerIdentity | None:
    """The identity a verified certificate's names give (see the module note):
    the first valid ``reconciler://`` URI, else a common name that is a node id."""
    for name in alt_names:
        identity = _from_uri(name)
        if identity is not None:
            return identity
    for name in common_names:
        if is_valid_node_id(name) and name not in set(PeerRole) - {PeerRole.NODE}:
            return PeerIdentity(PeerRole.NODE, name)
    return None


def _auth_strings(auth: Mapping[str, Iterable[bytes]], key: str) -> list[str]:
    return [value.decode("utf-8", "replace") for value in auth.get(key, [])]


def _is_local(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    return context.peer().startswith(_UNIX_PEER_PREFIXES)


def peer_identity_of(context: grpc.aio.ServicerContext[Any, Any]) -> PeerIdentity | None:
    """Who called: from the verified client certificate; a local operator on a Unix
    socket; None on a plaintext TCP connection or an unrecognised certificate."""
    if _is_local(context):
        return PeerIdentity(PeerRole.OPERATOR, "local", local=True)
    auth = context.auth_context()
    uris = _auth_strings(auth, "peer_uri") or _auth_strings(auth, "x509_subject_alternative_name")
    return identity_from_names(common_names=_auth_strings(auth, "x509_common_name"), alt_names=uris)


def peer_identity(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The node id bound to the caller's certificate (``ANY_NODE`` for a shared
    daemon certificate), or None when the caller is not a node."""
    identity = peer_identity_of(context)
    if identity is None or identity.role is not PeerRole.NODE:
        return None
    return identity.name


def require_node(
    context: grpc.aio.ServicerContext[Any, Any], node_id: str, *, tls_enabled: bool
) -> None:
    """Refuse (PermissionDenied) a call naming ``node_id`` from a certificate bound to
    another node, or from a caller that is not a node. A no-op when TLS is off."""
    if not tls_enabled:
        return
    identity = peer_identity_of(context)
    if identity is None or identity.role is not PeerRole.NODE:
        raise PermissionDenied(f"only node {node_id!r} may do this; the caller is not a node")
    if identity.name not in (node_id, ANY_NODE):
        raise PermissionDenied(
            f"the caller's certificate is for node {identity.name!r}, not {node_id!r}"
        )


def require_role(
    context: grpc.aio.ServicerContext[Any, Any],
    allowed: Collection[PeerRole],
    *,
    tls_enabled: bool,
) -> PeerIdentity | None:
    """The caller's identity, or PermissionDenied when its role is not ``allowed``.
    When TLS is off nothing is checked and the identity may be None."""
    identity = peer_identity_of(context)
    if not tls_enabled:
        return identity
    if identity is None:
        raise PermissionDenied("the caller's certificate names no reconciler identity")
    if identity.role not in allowed:
        wanted = ", ".join(sorted(r.value for r in allowed))
        raise PermissionDenied(f"a {identity.role.value} may not call this (only {wanted})")
    return identity


class RoleInterceptor(WrappingInterceptor):
    """Answers PERMISSION_DENIED to callers whose role is not allowed (TLS on only).

    Methods whose full name starts with one of ``exempt_prefixes`` (by default the
    health service) are served to any verified peer.
    """

    def __init__(
        self,
        allowed: Collection[PeerRole],
        *,
        tls_enabled: bool,
        exempt_prefixes: Sequence[str] = ("/grpc.health.v1.Health/",),
    ) -> None:
        super().__init__()
        self._allowed = frozenset(allowed)
        self._tls_enabled = tls_enabled
        self._exempt = tuple(exempt_prefixes)

    def wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if not self._tls_enabled or method.startswith(self._exempt):
            return handler
        guarded: grpc.RpcMethodHandler[Any, Any] = _guarded(handler, self._check)
        return guarded

    async def _check(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        try:
            require_role(context, self._allowed, tls_enabled=True)
        except PermissionDenied as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))


Check = Callable[["grpc.aio.ServicerContext[Any, Any]"], Awaitable[None]]


def _guarded(handler: grpc.RpcMethodHandler[Any, Any], check: Check) -> Any:
    """The same handler, running ``check`` before its behaviour."""
    codecs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_unary(handler.unary_unary, check), **codecs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_unary(handler.stream_unary, check), **codecs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_stream(handler.unary_stream, check), **codecs)
    if handler.stream_stream is not None:
        behaviour = _stream(handler.stream_stream, check)
        return grpc.stream_stream_rpc_method_handler(behaviour, **codecs)
    return handler


def _unary(behaviour: Any, check: Check) -> Any:
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await check(context)
        return await behaviour(request, context)

    return call


def _stream(behaviour: Any, check: Check) -> Any:
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await check(context)
        async for item in behaviour(request, context):
            yield item

    return call
