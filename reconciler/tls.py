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
- **Development PKI.** ``make_dev_pki`` writes a CA and certificates for a Manager, N
  nodes and an operator with ECDSA P-256 keys (``reconciler certs init``).

What this module does not do: decide which RPCs mutate (servicers call
``require_node``), rotate certificates, or check revocation. Operators read
``docs/security.md``.
"""

from __future__ import annotations

import datetime
import enum
import ipaddress
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from reconciler.config import ConfigError, TlsMode, TlsSettings, is_loopback_host, parse_host_port
from reconciler.model.errors import PermissionDenied
from reconciler.model.ids import is_valid_node_id
from reconciler.rpc import channel_options

__all__ = [
    "ANY_NODE",
    "MAX_PEM_BYTES",
    "URI_SCHEME",
    "DevPki",
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
    "make_dev_pki",
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


def _certificates(setting: str, path: str, data: bytes) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsFileError(setting, path, "not a PEM certificate") from None
    return certificates


def _private_key(setting: str, path: str, data: bytes) -> Any:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TlsFileError(setting, path, "encrypted private keys are not supported") from None
    except ValueError:
        raise TlsFileError(setting, path, "not a PEM private key") from None
    except UnsupportedAlgorithm as exc:
        raise TlsFileError(setting, path, f"unsupported private key: {exc}") from None


def _public_bytes(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def load_tls_material(tls: TlsSettings) -> TlsMaterial:
    """Read and check the three files of ``tls``; TlsFileError naming the bad one."""
    ca_pem = _read_bounded("tls.ca_file", tls.ca_file, private=False)
    _certificates("tls.ca_file", tls.ca_file, ca_pem)
    cert_pem = _read_bounded("tls.cert_file", tls.cert_file, private=False)
    leaf = _certificates("tls.cert_file", tls.cert_file, cert_pem)[0]
    key_pem = _read_bounded("tls.key_file", tls.key_file, private=True)
    key = _private_key("tls.key_file", tls.key_file, key_pem)
    if _public_bytes(key.public_key()) != _public_bytes(leaf.public_key()):
        problem = f"this key does not belong to the certificate in {tls.cert_file}"
        raise TlsFileError("tls.key_file", tls.key_file, problem)
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
        raise ConfigError(str(exc), origin=what) from None
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


class RoleInterceptor(grpc.aio.ServerInterceptor):
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
        self._allowed = frozenset(allowed)
        self._tls_enabled = tls_enabled
        self._exempt = tuple(exempt_prefixes)

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or not self._tls_enabled:
            return handler
        if handler_call_details.method.startswith(self._exempt):
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


# ---------------------------------------------------------------------- development PKI


@dataclass(frozen=True, slots=True)
class DevPki:
    """The files ``make_dev_pki`` wrote (certificate and key paths per holder)."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    manager_cert: Path
    manager_key: Path
    node_certs: dict[str, tuple[Path, Path]]
    operator: tuple[Path, Path] | None

    def files(self) -> Iterator[Path]:
        """Every file written, CA first."""
        yield from (self.ca_cert, self.ca_key, self.manager_cert, self.manager_key)
        for cert, key in self.node_certs.values():
            yield from (cert, key)
        if self.operator is not None:
            yield from self.operator


#: Days a development CA and its certificates are valid.
CA_VALID_DAYS: Final = 3650
LEAF_VALID_DAYS: Final = 825
_CLOCK_SKEW: Final = datetime.timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class _Issuer:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(role: PeerRole | str, common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "reconciler"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, str(role)),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _builder(subject: x509.Name, issuer: x509.Name, key: Any, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
    )


def _make_ca() -> _Issuer:
    key = _new_key()
    name = _name("ca", "reconciler development CA")
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    cert = (
        _builder(name, name, key.public_key(), CA_VALID_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .sign(key, hashes.SHA256())
    )
    return _Issuer(cert=cert, key=key)


def _alt_name(host: str) -> x509.GeneralName:
    """An IP address or DNS name SAN; ValueError for text that is neither."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        parse_host_port(f"{host}:1")
    except ValueError:
        raise ValueError(f"{host!r} is not a host name or address") from None
    return x509.DNSName(host)


def _unique(items: Sequence[x509.GeneralName]) -> list[x509.GeneralName]:
    return list(dict.fromkeys(items))


_LEAF_USAGE: Final = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def _make_leaf(
    ca: _Issuer,
    *,
    role: PeerRole,
    name: str,
    alt_names: Sequence[x509.GeneralName],
    server: bool,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    authority = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key())
    cert = (
        _builder(_name(role, name), ca.cert.subject, key.public_key(), LEAF_VALID_DAYS)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_LEAF_USAGE, critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(_unique(alt_names)), critical=False)
        .add_extension(authority, critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return cert, key


_LOOPBACK_HOSTS: Final = ("localhost", "127.0.0.1", "::1")


def _manager_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names = [_alt_name(h) for h in [*hosts, *_LOOPBACK_HOSTS] if h]
    return [*names, x509.UniformResourceIdentifier(identity_uri(PeerRole.MANAGER))]


def _node_names(node_id: str) -> list[x509.GeneralName]:
    names = [_alt_name(h) for h in (*_LOOPBACK_HOSTS, node_id)]
    return [*names, x509.UniformResourceIdentifier(identity_uri(PeerRole.NODE, node_id))]


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode`` from the first byte (temp + rename)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.chmod(temporary, mode)  # the umask may have narrowed a 0644 certificate
    os.replace(temporary, path)


def _node_ids(nodes: int | Sequence[str]) -> list[str]:
    ids = [f"node-{i}" for i in range(1, nodes + 1)] if isinstance(nodes, int) else list(nodes)
    for node_id in ids:
        if not is_valid_node_id(node_id):
            raise ValueError(f"{node_id!r} is not a valid node id")
    if len(set(ids)) != len(ids):
        raise ValueError("node ids repeat")
    return ids


def _layout(directory: Path, node_ids: Sequence[str], *, operator: bool) -> DevPki:
    def pair(stem: str) -> tuple[Path, Path]:
        return directory / f"{stem}.crt", directory / f"{stem}.key"

    return DevPki(
        directory=directory,
        ca_cert=directory / "ca.crt",
        ca_key=directory / "ca.key",
        manager_cert=directory / "manager.crt",
        manager_key=directory / "manager.key",
        node_certs={node_id: pair(node_id) for node_id in node_ids},
        operator=pair("operator") if operator else None,
    )


def _prepare_directory(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory")
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
        os.chmod(directory, 0o700)


def make_dev_pki(
    directory: str | os.PathLike[str],
    *,
    nodes: int | Sequence[str],
    manager_hosts: Sequence[str],
    operator: bool = True,
    force: bool = False,
) -> DevPki:
    """Write a development CA and certificates for a Manager, nodes and an operator.

    ``nodes`` is a count (``node-1`` ... ``node-N``) or a list of node ids. Keys are
    ECDSA P-256 (0600), certificates 0644, a new directory 0700. Raises
    FileExistsError naming every file already there unless ``force``, and ValueError
    for a bad node id or host; nothing is written then.
    """
    pki = _layout(Path(directory), _node_ids(nodes), operator=operator)
    manager_names = _manager_names(manager_hosts)  # ValueError before writing anything
    existing = [str(p) for p in pki.files() if p.exists() or p.is_symlink()]
    if existing and not force:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)} (use --force)")
    _prepare_directory(pki.directory)
    ca = _make_ca()
    _write(pki.ca_key, _key_pem(ca.key), mode=0o600)
    _write(pki.ca_cert, _cert_pem(ca.cert), mode=0o644)
    leaves = [(PeerRole.MANAGER, "manager", manager_names, True, pki.manager_cert, pki.manager_key)]
    for node_id, (cert_path, key_path) in pki.node_certs.items():
        leaves.append((PeerRole.NODE, node_id, _node_names(node_id), True, cert_path, key_path))
    if pki.operator is not None:
        uri = x509.UniformResourceIdentifier(identity_uri(PeerRole.OPERATOR, "operator"))
        leaves.append((PeerRole.OPERATOR, "operator", [uri], False, *pki.operator))
    for role, name, alt_names, server, cert_path, key_path in leaves:
        cert, key = _make_leaf(ca, role=role, name=name, alt_names=alt_names, server=server)
        _write(key_path, _key_pem(key), mode=0o600)
        _write(cert_path, _cert_pem(cert), mode=0o644)
    return pki
