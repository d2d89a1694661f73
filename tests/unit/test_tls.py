"""TLS files, identities and the development PKI, without a network."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from reconciler.cli.main import cli
from reconciler.config import ConfigError, TlsMode, TlsSettings
from reconciler.model.errors import PermissionDenied
from reconciler.pki import DevPki, make_dev_pki
from reconciler.tls import (
    ANY_NODE,
    PeerIdentity,
    PeerRole,
    TlsFileError,
    add_listen_port,
    channel_credentials,
    identity_from_names,
    insecure_loopback_channel,
    key_file_problem,
    load_tls_material,
    peer_identity,
    peer_identity_of,
    require_node,
    require_role,
    server_credentials,
    settings_from_files,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_dev_pki(
        tmp_path_factory.mktemp("pki") / "certs", nodes=2, manager_hosts=["mgr.example", "10.1.2.3"]
    )


def mtls(pki: DevPki, holder: str = "manager") -> TlsSettings:
    cert, key = (
        (pki.manager_cert, pki.manager_key) if holder == "manager" else pki.node_certs[holder]
    )
    return TlsSettings(
        mode=TlsMode.MTLS, ca_file=str(pki.ca_cert), cert_file=str(cert), key_file=str(key)
    )


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def alt_names(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(name.value) for name in san]


def usages(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------- dev PKI


def test_the_dev_pki_writes_keys_0600_certificates_0644_in_a_0700_directory(pki: DevPki) -> None:
    assert mode_of(pki.directory) == 0o700
    names = sorted(p.name for p in pki.directory.iterdir())
    assert names == sorted(p.name for p in pki.files())
    assert len(names) == 10
    for path in pki.files():
        assert mode_of(path) == (0o600 if path.suffix == ".key" else 0o644), path


def test_every_dev_certificate_is_signed_by_the_dev_ca(pki: DevPki) -> None:
    ca = load(pki.ca_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for path in pki.files():
        if path.suffix == ".crt" and path != pki.ca_cert:
            load(path).verify_directly_issued_by(ca)


def test_dev_keys_are_ecdsa_p256(pki: DevPki) -> None:
    for path in pki.files():
        if path.suffix == ".key":
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            assert key.curve.name == "secp256r1"


def test_the_manager_certificate_names_its_hosts_loopback_and_its_role(pki: DevPki) -> None:
    cert = load(pki.manager_cert)
    names = alt_names(cert)
    for expected in ("mgr.example", "10.1.2.3", "localhost", "127.0.0.1", "::1"):
        assert expected in names
    assert "reconciler://manager" in names
    assert usages(cert) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def test_a_node_certificate_names_loopback_and_its_node_id(pki: DevPki) -> None:
    cert = load(pki.node_certs["node-2"][0])
    assert alt_names(cert) == [
        "localhost",
        "127.0.0.1",
        "::1",
        "node-2",
        "reconciler://node/node-2",
    ]
    assert usages(cert) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def test_the_operator_certificate_is_for_clients_only(pki: DevPki) -> None:
    assert pki.operator is not None
    cert = load(pki.operator[0])
    assert alt_names(cert) == ["reconciler://operator/operator"]
    assert usages(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}


def test_the_dev_pki_refuses_to_overwrite_and_writes_nothing(pki: DevPki) -> None:
    before = {p: p.read_bytes() for p in pki.files()}
    with pytest.raises(FileExistsError, match=r"ca\.crt.*--force"):
        make_dev_pki(pki.directory, nodes=2, manager_hosts=[])
    assert {p: p.read_bytes() for p in pki.files()} == before


def test_the_dev_pki_overwrites_with_force(tmp_path: Path) -> None:
    first = make_dev_pki(tmp_path / "d", nodes=1, manager_hosts=[])
    old_ca = first.ca_cert.read_bytes()
    second = make_dev_pki(tmp_path / "d", nodes=1, manager_hosts=[], force=True)
    assert second.ca_cert.read_bytes() != old_ca
    assert mode_of(second.ca_key) == 0o600
    assert not list((tmp_path / "d").glob(".*.tmp"))


def test_the_dev_pki_takes_a_list_of_node_ids(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path / "d", nodes=["edge-a", "edge-b"], manager_hosts=[], operator=False)
    assert list(pki.node_certs) == ["edge-a", "edge-b"]
    assert pki.operator is None
    assert "reconciler://node/edge-a" in alt_names(load(pki.node_certs["edge-a"][0]))


@pytest.mark.parametrize(
    ("nodes", "hosts", "message"),
    [
        pytest.param(["bad/id"], [], "not a valid node id", id="bad-node-id"),
        pytest.param(["a", "a"], [], "repeat", id="repeated-node-id"),
        pytest.param(1, ["bad host"], "not a host name", id="bad-host"),
    ],
)
def test_the_dev_pki_refuses_bad_names_before_writing(
    tmp_path: Path, nodes: int | list[str], hosts: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_dev_pki(tmp_path / "d", nodes=nodes, manager_hosts=hosts)
    assert not (tmp_path / "d").exists()


# --------------------------------------------------------------------------- files


def test_the_dev_files_load_and_make_credentials(pki: DevPki) -> None:
    material = load_tls_material(mtls(pki, "node-1"))
    assert material.ca_pem == pki.ca_cert.read_bytes()
    assert isinstance(server_credentials(mtls(pki)), grpc.ServerCredentials)
    assert isinstance(channel_credentials(mtls(pki)), grpc.ChannelCredentials)


def test_insecure_mode_has_no_credentials() -> None:
    assert server_credentials(TlsSettings()) is None
    assert channel_credentials(TlsSettings()) is None


@pytest.fixture
def copied(pki: DevPki, tmp_path: Path) -> TlsSettings:
    """node-1's files copied to tmp_path, to be spoiled by a test."""
    names = {"ca_file": pki.ca_cert, "cert_file": pki.node_certs["node-1"][0]}
    names["key_file"] = pki.node_certs["node-1"][1]
    paths = {}
    for setting, source in names.items():
        target = tmp_path / source.name
        target.write_bytes(source.read_bytes())
        target.chmod(0o600)
        paths[setting] = str(target)
    return TlsSettings(mode=TlsMode.MTLS, **paths)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_key_file_others_may_read_is_refused_naming_it(copied: TlsSettings, mode: int) -> None:
    os.chmod(copied.key_file, mode)
    with pytest.raises(TlsFileError, match="chmod") as caught:
        server_credentials(copied)
    assert caught.value.setting == "tls.key_file"
    assert copied.key_file in str(caught.value)
    assert f"{mode:04o}" in str(caught.value)


def spoil_missing(path: Path) -> None:
    path.unlink()


def spoil_not_pem(path: Path) -> None:
    path.write_bytes(b"hello\n")


def spoil_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def spoil_too_large(path: Path) -> None:
    path.write_bytes(b"-" * (1024 * 1024 + 1))


@pytest.mark.parametrize(
    ("setting", "spoil", "message"),
    [
        pytest.param("ca_file", spoil_missing, "no such file", id="ca-missing"),
        pytest.param("ca_file", spoil_not_pem, "not a PEM certificate", id="ca-not-pem"),
        pytest.param("cert_file", spoil_directory, "not a regular file", id="cert-directory"),
        pytest.param("cert_file", spoil_too_large, "larger than", id="cert-too-large"),
        pytest.param("key_file", spoil_not_pem, "not a PEM private key", id="key-not-pem"),
        pytest.param("key_file", spoil_missing, "no such file", id="key-missing"),
    ],
)
def test_a_bad_tls_file_is_refused_naming_the_setting_and_file(
    copied: TlsSettings, setting: str, spoil: object, message: str
) -> None:
    path = getattr(copied, setting)
    spoil(Path(path))  # type: ignore[operator]
    with pytest.raises(TlsFileError, match=message) as caught:
        load_tls_material(copied)
    assert str(caught.value).startswith(f"tls.{setting}: {path}: ")


def test_a_key_of_another_certificate_is_refused(copied: TlsSettings, pki: DevPki) -> None:
    other_key = pki.node_certs["node-2"][1]
    Path(copied.key_file).write_bytes(other_key.read_bytes())
    with pytest.raises(TlsFileError, match="does not belong to the certificate"):
        load_tls_material(copied)


def test_an_encrypted_key_is_refused(copied: TlsSettings) -> None:
    key = serialization.load_pem_private_key(Path(copied.key_file).read_bytes(), password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    Path(copied.key_file).write_bytes(encrypted)
    with pytest.raises(TlsFileError, match="encrypted"):
        load_tls_material(copied)


def test_an_empty_file_setting_is_refused() -> None:
    with pytest.raises(TlsFileError, match=r"^tls\.ca_file: .*no file given"):
        load_tls_material(TlsSettings(mode=TlsMode.MTLS))


@pytest.mark.parametrize(
    ("mode", "owner", "euid", "refused"),
    [
        pytest.param(0o600, 1000, 1000, False, id="own-0600"),
        pytest.param(0o400, 1000, 1000, False, id="own-0400"),
        pytest.param(0o640, 1000, 1000, True, id="own-group-readable"),
        pytest.param(0o604, 1000, 1000, True, id="own-other-readable"),
        pytest.param(0o440, 0, 1000, False, id="root-owned-group-readable"),
        pytest.param(0o660, 0, 1000, True, id="root-owned-group-writable"),
        pytest.param(0o644, 0, 1000, True, id="root-owned-other-readable"),
        pytest.param(0o640, 0, 0, True, id="root-reading-own-group-readable"),
    ],
)
def test_key_file_permissions_follow_the_postgresql_rule(
    mode: int, owner: int, euid: int, refused: bool
) -> None:
    problem = key_file_problem(stat.S_IFREG | mode, owner_uid=owner, euid=euid)
    assert (problem is not None) is refused


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        pytest.param((None, None, None), TlsMode.INSECURE, id="none"),
        pytest.param(("a", "b", "c"), TlsMode.MTLS, id="all"),
    ],
)
def test_cli_tls_flags_make_settings(
    flags: tuple[str | None, str | None, str | None], expected: TlsMode
) -> None:
    assert settings_from_files(*flags).mode is expected


def test_cli_tls_flags_given_in_part_name_what_is_missing() -> None:
    with pytest.raises(ConfigError, match="--tls-cert, --tls-key"):
        settings_from_files("ca.crt", None, None)


# ------------------------------------------------------------------------ channels


@pytest.mark.parametrize(
    "address",
    [
        pytest.param("127.0.0.1:7060", id="ipv4"),
        pytest.param("[::1]:7060", id="ipv6"),
        pytest.param("localhost:7060", id="localhost"),
        pytest.param("unix:/tmp/x.sock", id="unix"),
    ],
)
async def test_an_insecure_channel_to_loopback_is_allowed(address: str) -> None:
    channel = insecure_loopback_channel(address)
    await channel.close()


@pytest.mark.parametrize(
    "address", [pytest.param("10.0.0.1:7060", id="ip"), pytest.param("mgr:7060", id="name")]
)
def test_an_insecure_channel_elsewhere_is_refused(address: str) -> None:
    with pytest.raises(ConfigError, match="not a loopback address"):
        insecure_loopback_channel(address)


def test_a_socket_path_without_its_scheme_is_refused_saying_how_to_write_it() -> None:
    with pytest.raises(ConfigError, match=r"a Unix socket is written unix:/run/d\.sock"):
        insecure_loopback_channel("/run/d.sock")


async def test_an_insecure_server_will_not_listen_beyond_loopback() -> None:
    server = grpc.aio.server()
    with pytest.raises(ConfigError, match=r"grpc\.listen: 0\.0\.0\.0 is not a loopback"):
        add_listen_port(server, "0.0.0.0:0", TlsSettings())
    await server.stop(None)


# ------------------------------------------------------------------------ identity


@pytest.mark.parametrize(
    ("common_names", "alt", "expected"),
    [
        pytest.param(
            [], ["reconciler://node/n1"], PeerIdentity(PeerRole.NODE, "n1"), id="node-uri"
        ),
        pytest.param(
            ["n1"], ["n1", "reconciler://node/n2"], PeerIdentity(PeerRole.NODE, "n2"), id="uri-wins"
        ),
        pytest.param(
            [], ["reconciler://node/*"], PeerIdentity(PeerRole.NODE, ANY_NODE), id="any-node"
        ),
        pytest.param(
            ["x"], ["reconciler://manager"], PeerIdentity(PeerRole.MANAGER, "manager"), id="mgr"
        ),
        pytest.param(
            [],
            ["reconciler://operator/alice"],
            PeerIdentity(PeerRole.OPERATOR, "alice"),
            id="operator",
        ),
        pytest.param(
            ["edge-7"], ["edge-7.example"], PeerIdentity(PeerRole.NODE, "edge-7"), id="cn"
        ),
        pytest.param(["manager"], [], None, id="cn-manager-is-reserved"),
        pytest.param(["operator"], [], None, id="cn-operator-is-reserved"),
        pytest.param(["bad name"], [], None, id="cn-not-a-node-id"),
        pytest.param([], ["reconciler://node/a/b"], None, id="uri-bad-node-id"),
        pytest.param([], ["reconciler://admin/x"], None, id="uri-unknown-role"),
        pytest.param([], ["https://node/n1"], None, id="other-scheme"),
        pytest.param([], [], None, id="nothing"),
    ],
)
def test_a_certificate_names_its_holder(
    common_names: list[str], alt: list[str], expected: PeerIdentity | None
) -> None:
    assert identity_from_names(common_names=common_names, alt_names=alt) == expected


@dataclass
class FakeContext:
    """The two things the identity functions read from a servicer context."""

    auth: dict[str, list[bytes]] = field(default_factory=dict)
    peer_text: str = "ipv4:127.0.0.1:5555"

    def auth_context(self) -> dict[str, list[bytes]]:
        return self.auth

    def peer(self) -> str:
        return self.peer_text


def context_for(uri: str) -> grpc.aio.ServicerContext:  # type: ignore[type-arg]
    auth = {"peer_uri": [uri.encode()], "x509_common_name": [b"whatever"]}
    return FakeContext(auth=auth)  # type: ignore[return-value]


PLAINTEXT: grpc.aio.ServicerContext = FakeContext(  # type: ignore[type-arg, assignment]
    auth={"transport_security_type": [b"insecure"]}
)
UNIX: grpc.aio.ServicerContext = FakeContext(peer_text="unix:/run/r.sock")  # type: ignore[type-arg, assignment]


def test_peer_identity_is_the_node_id_of_the_certificate() -> None:
    assert peer_identity(context_for("reconciler://node/node-1")) == "node-1"
    assert peer_identity(context_for("reconciler://manager")) is None
    assert peer_identity(PLAINTEXT) is None


def test_a_unix_socket_caller_is_a_local_operator() -> None:
    assert peer_identity_of(UNIX) == PeerIdentity(PeerRole.OPERATOR, "local", local=True)


def test_require_node_accepts_the_node_of_the_certificate() -> None:
    require_node(context_for("reconciler://node/node-1"), "node-1", tls_enabled=True)


def test_require_node_accepts_a_shared_certificate_for_any_node() -> None:
    require_node(context_for("reconciler://node/*"), "node-9", tls_enabled=True)


@pytest.mark.parametrize(
    "context",
    [
        pytest.param(context_for("reconciler://node/node-2"), id="another-node"),
        pytest.param(context_for("reconciler://operator/bob"), id="operator"),
        pytest.param(PLAINTEXT, id="no-certificate"),
    ],
)
def test_require_node_refuses_any_other_caller(context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
    with pytest.raises(PermissionDenied, match="node-1"):
        require_node(context, "node-1", tls_enabled=True)


def test_require_node_checks_nothing_without_tls() -> None:
    require_node(context_for("reconciler://node/node-2"), "node-1", tls_enabled=False)


def test_require_role_returns_an_allowed_identity() -> None:
    allowed = frozenset({PeerRole.MANAGER, PeerRole.OPERATOR})
    got = require_role(context_for("reconciler://manager"), allowed, tls_enabled=True)
    assert got == PeerIdentity(PeerRole.MANAGER, "manager")
    assert require_role(UNIX, allowed, tls_enabled=True) is not None


def test_require_role_refuses_a_node_where_only_the_manager_may_call() -> None:
    with pytest.raises(PermissionDenied, match="a node may not call this"):
        require_role(context_for("reconciler://node/n1"), {PeerRole.MANAGER}, tls_enabled=True)


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_certs_init_writes_the_files_and_prints_the_settings(
    runner: CliRunner, tmp_path: Path
) -> None:
    target = tmp_path / "certs"
    result = runner.invoke(
        cli, ["certs", "init", str(target), "--nodes", "3", "--manager-host", "mgr.example"]
    )
    assert result.exit_code == 0, result.output
    assert mode_of(target) == 0o700
    for name in ("ca", "manager", "node-1", "node-2", "node-3", "operator"):
        assert mode_of(target / f"{name}.key") == 0o600
        assert mode_of(target / f"{name}.crt") == 0o644
        assert f"wrote {target / name}.crt" in result.stdout
    assert "mode: mtls" in result.stdout
    assert f"key_file: {target / 'node-1.key'}" in result.stdout
    assert f"--tls-cert {target / 'operator.crt'}" in result.stdout
    assert "mgr.example" in alt_names(load(target / "manager.crt"))


def test_certs_init_refuses_to_overwrite_without_force(runner: CliRunner, tmp_path: Path) -> None:
    target = tmp_path / "certs"
    assert runner.invoke(cli, ["certs", "init", str(target)]).exit_code == 0
    ca = (target / "ca.crt").read_bytes()
    refused = runner.invoke(cli, ["certs", "init", str(target)])
    assert refused.exit_code == 1
    assert "refusing to overwrite" in refused.stderr
    assert "--force" in refused.stderr
    assert (target / "ca.crt").read_bytes() == ca
    forced = runner.invoke(cli, ["certs", "init", str(target), "--force"])
    assert forced.exit_code == 0, forced.output
    assert (target / "ca.crt").read_bytes() != ca


def test_certs_init_names_a_bad_host(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli, ["certs", "init", str(tmp_path / "c"), "--manager-host", "a b"])
    assert result.exit_code == 1
    assert result.stderr == "certs init: 'a b' is not a host name or address\n"
