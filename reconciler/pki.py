"""A development certificate authority: ``reconciler certs init``.

``make_dev_pki`` writes a CA and certificates for a Manager, N nodes and an operator
with ECDSA P-256 keys, each naming its holder the way ``reconciler.tls`` reads
identities (a ``reconciler://`` URI subject alternative name). It is for development
and tests; production certificates come from your own CA or cert-manager
(``docs/security.md``). Only this module loads the ``cryptography`` toolkit.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from reconciler.config import parse_host_port
from reconciler.model.ids import is_valid_node_id
from reconciler.tls import PeerRole, identity_uri

__all__ = ["CA_VALID_DAYS", "LEAF_VALID_DAYS", "DevPki", "make_dev_pki"]


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
