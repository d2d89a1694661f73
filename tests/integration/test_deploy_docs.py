"""docs/deploy.md and deploy/: every command that needs no cluster is run here.

The `$ ` lines of the doc's ```console blocks are either run (chart rendering and
lint through Helm's engine, `reconciler config check`, `reconciler certs init`) or
belong to a known kind that needs a cluster or a host (kubectl, helm install, docker,
sudo); a line of neither kind fails the suite. Output lines under a command starting
with "Error:" say the command must fail with that message. Also checked here: the
image's gRPC health check against real servers, the systemd units, the compose file.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import helm_python
import pytest
import trustme
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helm_support import (
    CHART_DIR,
    REPO_ROOT,
    check_settings,
    lint,
    objects,
    parse_helm_command,
    render,
    validate_object,
)

DOC = REPO_ROOT / "docs" / "deploy.md"
DEPLOY = REPO_ROOT / "deploy"
BIN = Path(sys.executable).parent
RUNNABLE = ("helm template ", "helm lint ", "reconciler config check ", "reconciler certs init ")
NEEDS_CLUSTER_OR_HOST = ("kubectl ", "helm install ", "helm upgrade ", "docker ", "sudo ")


@dataclass(frozen=True)
class DocCommand:
    line: str
    output: tuple[str, ...]

    @property
    def expected_error(self) -> str:
        """The text after "Error:" and the lines below it, or "" when it must succeed."""
        if not self.output or not self.output[0].startswith("Error:"):
            return ""
        return "\n".join([self.output[0].removeprefix("Error:").strip(), *self.output[1:]])


def doc_commands() -> list[DocCommand]:
    commands: list[DocCommand] = []
    for block in re.findall(r"```console\n(.*?)```", DOC.read_text(), flags=re.S):
        indent = 0
        for raw in block.splitlines():
            text = raw.strip()
            if text.startswith("$ "):
                indent = len(raw) - len(raw.lstrip())
                commands.append(DocCommand(text[2:], ()))
            elif text and commands:
                last = commands[-1]
                commands[-1] = DocCommand(last.line, (*last.output, raw[indent:].rstrip()))
    return commands


def runnable() -> list[Any]:
    return [pytest.param(c, id=c.line[:90]) for c in doc_commands() if c.line.startswith(RUNNABLE)]


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A scratch directory that looks like the repository root for the doc's paths."""
    for name in ("charts", "deploy"):
        (tmp_path / name).symlink_to(REPO_ROOT / name)
    return tmp_path


def test_every_console_command_is_run_here_or_needs_a_cluster_or_host() -> None:
    lines = [c.line for c in doc_commands()]
    unknown = [line for line in lines if not line.startswith(RUNNABLE + NEEDS_CLUSTER_OR_HOST)]
    assert unknown == []
    for kind in RUNNABLE:
        assert any(line.startswith(kind) for line in lines), f"the doc shows no {kind.strip()!r}"


@pytest.mark.helm
@pytest.mark.parametrize("command", [p for p in runnable() if p.values[0].line.startswith("helm")])
def test_helm_command_in_the_doc_does_what_the_doc_says(
    command: DocCommand, workspace: Path
) -> None:
    parsed = parse_helm_command(command.line, cwd=workspace)
    assert parsed.chart.resolve() == CHART_DIR
    if command.expected_error:
        with pytest.raises(helm_python.HelmError) as caught:
            render(parsed.values)
        assert command.expected_error in str(caught.value)
        return
    if parsed.action == "lint":
        assert parsed.strict
        assert lint(parsed.values)["errors"] == []
        return
    docs = objects(render(parsed.values))
    assert docs
    for doc in docs:
        validate_object(doc)


@pytest.mark.parametrize(
    "command", [p for p in runnable() if p.values[0].line.startswith("reconciler")]
)
def test_reconciler_command_in_the_doc_succeeds(command: DocCommand, workspace: Path) -> None:
    argv = command.line.split()
    result = subprocess.run(
        [str(BIN / "reconciler"), *argv[1:]],
        cwd=workspace,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    if argv[1:3] == ["certs", "init"]:
        check_certs(workspace / argv[3], argv)


def check_certs(directory: Path, argv: list[str]) -> None:
    from cryptography import x509

    nodes = int(argv[argv.index("--nodes") + 1])
    expected = ["ca.crt", "manager.crt", "manager.key"]
    expected += [f"node-{i}.{ext}" for i in range(1, nodes + 1) for ext in ("crt", "key")]
    for name in expected:
        assert (directory / name).is_file(), name
    cert = x509.load_pem_x509_certificate((directory / "manager.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    host = argv[argv.index("--manager-host") + 1]
    assert host in san.get_values_for_type(x509.DNSName)


@pytest.mark.parametrize(
    "command",
    [p for p in runnable() if p.values[0].line.startswith("reconciler config check")],
)
def test_config_files_the_doc_checks_load_with_the_settings_loader(
    command: DocCommand, tmp_path: Path
) -> None:
    argv = command.line.split()
    role = argv[argv.index("--role") + 1]
    data = yaml.safe_load((REPO_ROOT / argv[3]).read_text())
    check_settings(role, data, tmp_path)


# -------------------------------------------------------------------- the image's probe


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def start_health_server(*, serving: bool, credentials: Any = None) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    status = health_pb2.HealthCheckResponse.SERVING if serving else 0
    servicer.set("", status or health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, f"127.0.0.1:{port}"


def run_healthcheck(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("serving", "code"),
    [pytest.param(True, 0, id="serving-is-healthy"), pytest.param(False, 1, id="not-serving")],
)
def test_image_healthcheck_reports_the_grpc_health_status(serving: bool, code: int) -> None:
    server, address = start_health_server(serving=serving)
    try:
        result = run_healthcheck(address)
    finally:
        server.stop(None)
    assert result.returncode == code, result.stdout + result.stderr


def test_image_healthcheck_fails_when_nothing_listens() -> None:
    server, address = start_health_server(serving=True)
    server.stop(None).wait()
    result = run_healthcheck(address)
    assert result.returncode == 1
    assert "unhealthy" in result.stderr


def test_image_healthcheck_speaks_mtls_with_a_cert_manager_style_secret(
    ca: trustme.CA, tmp_path: Path
) -> None:
    server_cert = ca.issue_cert("rel-reconciler-manager.reconciler.svc")
    secret = tmp_path / "tls"
    secret.mkdir()
    (secret / "ca.crt").write_bytes(ca.cert_pem.bytes())
    (secret / "tls.crt").write_bytes(server_cert.cert_chain_pems[0].bytes())
    (secret / "tls.key").write_bytes(server_cert.private_key_pem.bytes())
    credentials = grpc.ssl_server_credentials(
        [(server_cert.private_key_pem.bytes(), server_cert.cert_chain_pems[0].bytes())],
        root_certificates=ca.cert_pem.bytes(),
        require_client_auth=True,
    )
    server, address = start_health_server(serving=True, credentials=credentials)
    try:
        with_cert = run_healthcheck(address, "--tls-dir", str(secret))
        without_cert = run_healthcheck(address)
    finally:
        server.stop(None)
    assert with_cert.returncode == 0, with_cert.stderr
    assert without_cert.returncode == 1


# ----------------------------------------------------------------- systemd and compose


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / "systemd" / name)
    return parser


@pytest.mark.parametrize(
    ("name", "role", "state"),
    [
        pytest.param("reconciler-daemon.service", "daemon", "reconciler", id="daemon"),
        pytest.param("reconciler-manager.service", "manager", "reconciler-manager", id="manager"),
    ],
)
def test_systemd_units_are_hardened_and_use_the_example_config(
    name: str, role: str, state: str, tmp_path: Path
) -> None:
    service = unit(name)["Service"]
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["StateDirectory"] == state
    assert service["RuntimeDirectory"]
    assert f"/var/lib/{state}" in service["ReadWritePaths"].split()
    assert service["User"] == "reconciler"
    config = f"/etc/reconciler/{role}.yaml"
    assert service["ExecStart"].split()[1:] == [role, "--config", config]
    data = yaml.safe_load((DEPLOY / "systemd" / f"{role}.yaml").read_text())
    assert data["state_dir"] == f"/var/lib/{state}"
    check_settings(role, data, tmp_path)


def test_daemon_unit_leaves_agents_running_when_the_daemon_stops() -> None:
    service = unit("reconciler-daemon.service")["Service"]
    assert service["KillMode"] == "process"
    assert service["RuntimeDirectoryPreserve"] == "yes"
    data = yaml.safe_load((DEPLOY / "systemd" / "daemon.yaml").read_text())
    assert data["agents"]["stop_agents_on_exit"] is False
    assert data["heartbeat"]["socket_path"].startswith("/run/reconciler/")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    copies = []
    for source in sorted((DEPLOY / "systemd").glob("*.service")):
        copy = tmp_path / source.name
        copy.write_text(source.read_text().replace("/usr/local/bin/reconciler", "/bin/true"))
        copies.append(str(copy))
    result = subprocess.run(
        ["systemd-analyze", "verify", *copies],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_jaeger_a_manager_and_a_daemon_sending_traces_to_jaeger(
    tmp_path: Path,
) -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"jaeger", "manager", "daemon"}
    jaeger = services["jaeger"]
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert any(port.endswith(":16686") for port in jaeger["ports"])
    build = services["manager"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert services["daemon"]["image"] == services["manager"]["image"]
    for role in ("manager", "daemon"):
        assert services[role]["command"][0] == role
        source = services[role]["volumes"][0].split(":")[0]
        data = yaml.safe_load((DEPLOY / source).read_text())
        assert data["telemetry"] == {"exporter": "otlp", "otlp_endpoint": "http://jaeger:4317"}
        check_settings(role, data, tmp_path)


def test_dockerfile_installs_the_checkout_with_pip_and_runs_unprivileged() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    instructions = [line.split()[0] for line in text.splitlines() if line and line[0].isupper()]
    assert "ADD" not in instructions, "COPY only: nothing is fetched by the build"
    assert not re.search(r"\b(curl|wget|git clone)\b", text)
    assert re.search(r"pip install \"/src\[postgres\]\"", text)
    assert "FROM python:3.11-slim" in text
    assert re.search(r"^USER 10001:10001$", text, flags=re.M)
    assert 'ENTRYPOINT ["reconciler"]' in text
    assert 'CMD ["reconciler-healthcheck"]' in text
    for source in re.findall(r"^COPY (?!--from)(\S+)", text, flags=re.M):
        assert (REPO_ROOT / source).exists(), source
