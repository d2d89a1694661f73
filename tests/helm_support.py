"""Render the Helm chart with the real Helm engine and check what comes out.

What: load charts/reconciler with helm_python (Helm's own Go library behind a C ABI),
render or lint it with given values, split the output into Kubernetes objects,
validate each against the Kubernetes API schemas (kubernetes-validate), and check the
reconciler config files inside the ConfigMaps against the settings contract.
What not: no cluster and no network; a `helm` binary is not needed. Objects whose
kinds are custom resources (ServiceMonitor) have no published schema and get a
structural check here instead.
Where next: tests/integration/test_chart.py and tests/integration/test_deploy_docs.py.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

__all__ = [
    "CHART_DIR",
    "KUBE_VERSION",
    "REPO_ROOT",
    "SETTINGS_CONTRACT",
    "HelmCommand",
    "check_settings",
    "config_of",
    "container_env",
    "find",
    "lint",
    "merge_values",
    "objects",
    "parse_helm_command",
    "render",
    "validate_object",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
CHART_DIR = REPO_ROOT / "charts" / "reconciler"
KUBE_VERSION = "1.31.0"
RELEASE = "rel"
NAMESPACE = "reconciler"

_TLS = {"mode", "ca_file", "cert_file", "key_file"}
_LOGGING = {"format", "level"}
_TELEMETRY = {"exporter", "otlp_endpoint"}

# Section -> fields of the settings contract (docs/configuration.md); None marks a scalar.
SETTINGS_CONTRACT: dict[str, dict[str, set[str] | None]] = {
    "daemon": {
        "node": {"id", "labels"},
        "state_dir": None,
        "grpc": {"listen", "unix_socket", "max_message_bytes", "max_concurrent_rpcs"},
        "tls": _TLS,
        "manager": {"address", "heartbeat_interval_s", "report_interval_s", "call_timeout_s"},
        "heartbeat": {
            "socket_path",
            "http_listen",
            "max_frame_bytes",
            "max_connections",
            "idle_timeout_s",
            "http_queue_size",
            "http_workers",
            "allow_unmanaged",
        },
        "agents": {
            "allowed_commands",
            "allow_root",
            "log_dir",
            "log_max_bytes",
            "log_backups",
            "failure_output",
            "stop_agents_on_exit",
        },
        "backoff": {"initial_s", "max_s", "reset_after_s", "burst_starts", "burst_window_s"},
        "monitor": {"interval_s", "retention_s"},
        "metrics": {"listen"},
        "logging": _LOGGING,
        "telemetry": _TELEMETRY,
    },
    "manager": {
        "state_dir": None,
        "grpc": {"listen", "max_message_bytes", "max_concurrent_rpcs"},
        "tls": _TLS,
        "store": {"backend", "sqlite_path", "postgres_dsn", "pool_size"},
        "nodes": {"not_ready_after_s"},
        "push": {"concurrency", "timeout_s", "max_attempts"},
        "retention": {"metrics_window_s", "events_max"},
        "metrics": {"listen"},
        "logging": _LOGGING,
        "telemetry": _TELEMETRY,
    },
}


def render(values: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` would print it."""
    with helm_python.Chart.load(CHART_DIR) as chart:
        rendered: dict[str, str] = chart.render(
            values=dict(values or {}), name=RELEASE, namespace=NAMESPACE
        )
    return rendered


def lint(values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`helm lint --strict` for the chart with these values."""
    report: dict[str, Any] = helm_python.lint(
        CHART_DIR,
        dict(values or {}),
        strict=True,
        namespace=NAMESPACE,
        kube_version=f"v{KUBE_VERSION}",
    )
    return report


def objects(rendered: Mapping[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object in the rendered templates (NOTES.txt left out)."""
    found: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        found.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return found


def find(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    """The one object of this kind whose name ends with name_suffix."""
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(matches) == 1, f"{len(matches)} {kind} objects named *{name_suffix}"
    return matches[0]


def validate_object(doc: dict[str, Any]) -> None:
    """Validate against the Kubernetes schema for KUBE_VERSION (strict: no unknown fields)."""
    try:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    except SchemaNotFoundError:
        _check_custom_resource(doc)


def _check_custom_resource(doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "monitoring.coreos.com/v1", doc["apiVersion"]
    assert doc["kind"] == "ServiceMonitor", doc["kind"]
    spec = doc["spec"]
    assert spec["selector"]["matchLabels"], "a ServiceMonitor must select its Service"
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval"}, endpoint
        assert endpoint["port"] == "metrics"


def config_of(configmap: dict[str, Any]) -> dict[str, Any]:
    """The reconciler config.yaml carried by a ConfigMap, parsed."""
    parsed: dict[str, Any] = yaml.safe_load(configmap["data"]["config.yaml"])
    return parsed


def check_settings(
    role: str, data: Mapping[str, Any], tmp_path: Path, *, env: Mapping[str, str] | None = None
) -> None:
    """Check a config against the written contract, then load it with the project's
    loader (reconciler.config) when that is importable, with the container's env."""
    _check_contract_keys(role, data)
    loader = _project_loader(role)
    if loader is None:
        return
    path = tmp_path / f"{role}.yaml"
    path.write_text(yaml.safe_dump(dict(data)))
    loader(path, env=dict(env or {}))


def _project_loader(role: str) -> Any:
    try:
        config = importlib.import_module("reconciler.config")
    except ImportError:
        return None
    return getattr(config, f"load_{role}_settings", None)


def _check_contract_keys(role: str, data: Mapping[str, Any]) -> None:
    contract = SETTINGS_CONTRACT[role]
    unknown = set(data) - set(contract)
    assert not unknown, f"{role} config has unknown top-level keys {sorted(unknown)}"
    for section, value in data.items():
        fields = contract[section]
        if fields is None:
            assert not isinstance(value, dict), f"{role}: {section} is a scalar"
            continue
        assert isinstance(value, dict), f"{role}: {section} must be a mapping"
        extra = set(value) - fields
        assert not extra, f"{role}: unknown keys {sorted(extra)} in section {section}"


def merge_values(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge Helm values: maps merge, everything else is replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = merge_values(merged[key], value)
        else:
            merged[key] = value
    return merged


@dataclass(frozen=True)
class HelmCommand:
    """A `helm template` or `helm lint` line from the docs, reduced to its inputs."""

    action: str
    chart: Path
    values: dict[str, Any] = field(default_factory=dict)
    strict: bool = False


def parse_helm_command(line: str, *, cwd: Path) -> HelmCommand:
    """Parse `helm template NAME CHART ...` or `helm lint CHART ...` (-f, --set, ...)."""
    argv = shlex.split(line)
    assert argv[0] == "helm", line
    assert argv[1] in {"template", "lint"}, line
    parser = argparse.ArgumentParser(prog="helm", add_help=False, exit_on_error=False)
    parser.add_argument("positional", nargs="+")
    parser.add_argument("-f", "--values", action="append", default=[])
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--set-string", action="append", default=[])
    parser.add_argument("-n", "--namespace")
    parser.add_argument("--strict", action="store_true")
    args = parser.parse_args(argv[2:])
    chart = cwd / args.positional[-1]
    values: dict[str, Any] = {}
    for name in args.values:
        values = merge_values(values, yaml.safe_load((cwd / name).read_text()) or {})
    for expression in args.set:
        values = merge_values(values, helm_python.parse_set_string(expression))
    for expression in args.set_string:
        values = merge_values(values, helm_python.parse_set_string_values(expression))
    return HelmCommand(action=argv[1], chart=chart, values=values, strict=args.strict)


# Stand-ins for values the kubelet fills in at run time.
_FIELD_VALUES = {
    "metadata.name": "rel-reconciler-sidecar-demo-7d4b9-x2x7q",
    "spec.nodeName": "node-1",
    "status.podIP": "10.244.1.17",
}
_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_SECRET_VALUE = "postgresql://reconciler@postgres.db.svc:5432/reconciler"


def container_env(container: Mapping[str, Any]) -> dict[str, str]:
    """A container's environment as the process would see it (secrets and fields faked,
    ``$(NAME)`` references to earlier variables expanded as the kubelet does)."""
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = _REFERENCE.sub(lambda m: env.get(m[1], m[0]), str(entry["value"]))
        elif "fieldRef" in entry["valueFrom"]:
            env[entry["name"]] = _FIELD_VALUES[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[entry["name"]] = _SECRET_VALUE
    return env
