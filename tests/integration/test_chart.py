"""The Helm chart, rendered by Helm's own engine and checked against Kubernetes schemas.

Covers every mode (Manager with one and three replicas, daemon as a sidecar and as a
DaemonSet, mTLS and insecure development mode), strict lint, the values the chart must
refuse, the sidecar pod's shared socket volume, and the config files in the ConfigMaps
against the settings contract.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helm_support import (
    CHART_DIR,
    check_settings,
    config_of,
    container_env,
    find,
    lint,
    merge_values,
    objects,
    render,
    validate_object,
)

pytestmark = pytest.mark.helm

CERTS = {"tls": {"managerSecretName": "mgr-tls", "daemonSecretName": "node-tls"}}


def ci_values(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHART_DIR / "ci" / f"{name}-values.yaml").read_text())
    return loaded


MODES = [
    pytest.param(CERTS, {"Deployment": 1, "DaemonSet": 0}, id="manager-1-replica-sqlite-mtls"),
    pytest.param(
        ci_values("ha"), {"Deployment": 1, "DaemonSet": 0}, id="manager-3-replicas-postgres"
    ),
    pytest.param(ci_values("sidecar"), {"Deployment": 2, "DaemonSet": 0}, id="sidecar-demo-mtls"),
    pytest.param(ci_values("daemonset"), {"Deployment": 1, "DaemonSet": 1}, id="daemonset-mtls"),
    pytest.param(ci_values("insecure-dev"), {"Deployment": 2, "DaemonSet": 0}, id="tls-off-dev"),
]


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in {"Deployment", "DaemonSet"}]


def containers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for w in workloads(docs) for c in w["spec"]["template"]["spec"]["containers"]]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.mark.parametrize(("values", "counts"), MODES)
def test_every_mode_renders_objects_that_kubernetes_accepts(
    values: dict[str, Any], counts: dict[str, int]
) -> None:
    docs = objects(render(values))
    for doc in docs:
        validate_object(doc)
    for kind, count in counts.items():
        assert sum(d["kind"] == kind for d in docs) == count, kind


@pytest.mark.parametrize(("values", "counts"), MODES)
def test_every_mode_passes_strict_lint(values: dict[str, Any], counts: dict[str, int]) -> None:
    report = lint(values)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize(("values", "counts"), MODES)
def test_each_server_container_loads_its_configmap_and_env_as_valid_settings(
    values: dict[str, Any], counts: dict[str, int], tmp_path: Path
) -> None:
    docs = objects(render(values))
    checked = 0
    for workload in workloads(docs):
        pod = workload["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            if container.get("args", [""])[0] not in {"daemon", "manager"}:
                continue
            role = container["args"][0]
            mount = next(
                m
                for m in container["volumeMounts"]
                if m["mountPath"] == "/etc/reconciler/config.yaml"
            )
            name = volumes[mount["name"]]["configMap"]["name"]
            config = config_of(find(docs, "ConfigMap", name))
            check_settings(role, config, tmp_path, env=container_env(container))
            checked += 1
    assert checked == counts["Deployment"] + counts["DaemonSet"]


@pytest.mark.parametrize(("values", "counts"), MODES)
def test_every_container_runs_hardened(values: dict[str, Any], counts: dict[str, int]) -> None:
    docs = objects(render(values))
    for workload in workloads(docs):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
    for container in containers(docs):
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True, container["name"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, container["name"]
        assert container["resources"]["limits"]["memory"], container["name"]


@pytest.mark.parametrize(
    ("values", "port", "tls_dir"),
    [
        pytest.param(CERTS, 7060, True, id="mtls-presents-the-mounted-certificate"),
        pytest.param(ci_values("insecure-dev"), 7060, False, id="insecure-plaintext-loopback"),
    ],
)
def test_manager_probes_ask_the_grpc_health_service(
    values: dict[str, Any], port: int, tls_dir: bool
) -> None:
    manager = find(objects(render(values)), "Deployment", "-manager")
    container = manager["spec"]["template"]["spec"]["containers"][0]
    expected = ["reconciler-healthcheck", f"127.0.0.1:{port}"]
    if tls_dir:
        expected += ["--tls-dir", "/etc/reconciler/tls"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts["/etc/reconciler/tls"] == "tls"
    assert container["livenessProbe"]["exec"]["command"] == expected
    assert container["readinessProbe"]["exec"]["command"] == expected


def test_values_that_must_be_refused_are_refused_with_a_message_naming_them() -> None:
    cases = [
        (merge_values(CERTS, {"manager": {"replicas": 3}}), "/manager/store/backend"),
        ({"tls": {"mode": "mtls", "daemonSecretName": "node-tls"}}, "/tls/managerSecretName"),
        ({"tls": {"mode": "mtls", "managerSecretName": "m"}}, "/tls/daemonSecretName"),
        (merge_values(CERTS, {"replicaCount": 2}), "additional properties 'replicaCount'"),
        ({"tls": {"mode": "insecure"}}, "/tls/insecureDevelopmentMode"),
        (
            merge_values(CERTS, {"manager": {"store": {"backend": "postgres"}}}),
            "/manager/store/postgres/existingSecret",
        ),
        (merge_values(CERTS, {"tls": {"mode": "plaintext"}}), "/tls/mode"),
    ]
    for values, message in cases:
        with pytest.raises(helm_python.HelmValuesError, match="schema") as caught:
            render(values)
        assert message in str(caught.value), (values, str(caught.value))
        assert any(message in error for error in lint(values)["errors"]), values


@pytest.mark.parametrize(
    ("values", "sentence"),
    [
        pytest.param(
            merge_values(CERTS, {"manager": {"replicas": 3}}),
            "manager.replicas=3 needs manager.store.backend=postgres",
            id="replicas-with-sqlite",
        ),
        pytest.param(
            {"tls": {"daemonSecretName": "node-tls"}},
            "tls.mode=mtls needs tls.managerSecretName",
            id="mtls-without-manager-secret",
        ),
        pytest.param(
            {"tls": {"mode": "insecure"}},
            "set tls.insecureDevelopmentMode=true",
            id="insecure-not-confirmed",
        ),
    ],
)
def test_templates_explain_cross_field_rules_when_schema_checks_are_skipped(
    values: dict[str, Any], sentence: str, tmp_path: Path
) -> None:
    chart_copy = tmp_path / "reconciler"
    shutil.copytree(CHART_DIR, chart_copy)
    (chart_copy / "values.schema.json").unlink()
    with (
        helm_python.Chart.load(chart_copy) as chart,
        pytest.raises(helm_python.HelmRenderError, match=r"validate\.yaml") as caught,
    ):
        chart.render(values=values, name="rel")
    assert sentence in str(caught.value)


def test_three_manager_replicas_use_postgres_from_a_secret_and_a_budget() -> None:
    docs = objects(render(ci_values("ha")))
    manager = find(docs, "Deployment", "-manager")
    assert manager["spec"]["replicas"] == 3
    assert "strategy" not in manager["spec"], "replicas roll; Recreate is for SQLite only"
    container = manager["spec"]["template"]["spec"]["containers"][0]
    dsn = env_of(container)["RECONCILER_STORE__POSTGRES_DSN"]
    assert dsn == {"secretKeyRef": {"name": "reconciler-postgres", "key": "dsn"}}
    config = config_of(find(docs, "ConfigMap", "-manager"))
    assert config["store"]["backend"] == "postgres"
    assert "postgres_dsn" not in config["store"], "the DSN must never sit in a ConfigMap"
    budget = find(docs, "PodDisruptionBudget", "-manager")
    assert budget["spec"]["selector"] == manager["spec"]["selector"]


def test_one_sqlite_manager_recreates_instead_of_running_two_writers() -> None:
    manager = find(objects(render(CERTS)), "Deployment", "-manager")
    assert manager["spec"]["replicas"] == 1
    assert manager["spec"]["strategy"] == {"type": "Recreate"}


def test_sidecar_pod_shares_the_socket_volume_the_daemon_config_points_into() -> None:
    docs = objects(render(ci_values("sidecar")))
    demo = find(docs, "Deployment", "-sidecar-demo")
    pod = demo["spec"]["template"]["spec"]
    by_name = {c["name"]: c for c in pod["containers"]}
    agent, daemon = by_name["agent"], by_name["reconciler-daemon"]
    assert agent["command"][:3] == ["agentlet", "run", "--"]

    agent_mounts = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}
    daemon_mounts = {m["name"]: m["mountPath"] for m in daemon["volumeMounts"]}
    shared = set(agent_mounts) & set(daemon_mounts)
    assert shared == {"reconciler-run"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["reconciler-run"]
    socket_dir = daemon_mounts["reconciler-run"]
    assert agent_mounts["reconciler-run"] == socket_dir

    config_volume = volumes["reconciler-daemon-config"]["configMap"]["name"]
    config = config_of(find(docs, "ConfigMap", config_volume))
    socket_path = config["heartbeat"]["socket_path"]
    assert Path(socket_path).parent == Path(socket_dir)
    assert config["heartbeat"]["allow_unmanaged"] is True
    env = env_of(agent)
    assert env["RECONCILER_HEARTBEAT_SOCKET"] == socket_path
    assert env["RECONCILER_AGENT_ID"] == "demo-agent"
    assert env_of(daemon)["RECONCILER_NODE__ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_daemonset_runs_one_daemon_per_node_with_the_allow_list_from_values() -> None:
    docs = objects(render(ci_values("daemonset")))
    daemonset = find(docs, "DaemonSet", "-daemon")
    container = daemonset["spec"]["template"]["spec"]["containers"][0]
    assert env_of(container)["RECONCILER_NODE__ID"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    env = container_env(container)
    assert env["RECONCILER_GRPC__ADVERTISE_ADDRESS"] == "10.244.1.17", "the pod IP"
    config = config_of(find(docs, "ConfigMap", "-daemon-node"))
    assert config["agents"]["allowed_commands"] == ["/opt/reconciler/bin/*", "/usr/bin/sleep"]
    assert config["heartbeat"]["allow_unmanaged"] is False
    assert config["manager"]["address"] == "rel-reconciler-manager.reconciler.svc:7060"
    assert config["telemetry"] == {
        "exporter": "otlp",
        "otlp_endpoint": "http://jaeger-collector.observability:4317",
    }
    monitors = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceMonitor"}
    assert monitors == {"rel-reconciler-manager", "rel-reconciler-daemon"}


def test_mtls_configs_read_cert_manager_keys_from_the_mounted_secret() -> None:
    docs = objects(render(ci_values("sidecar")))
    for configmap in (d for d in docs if d["kind"] == "ConfigMap"):
        tls = config_of(configmap)["tls"]
        assert tls == {
            "mode": "mtls",
            "ca_file": "/etc/reconciler/tls/ca.crt",
            "cert_file": "/etc/reconciler/tls/tls.crt",
            "key_file": "/etc/reconciler/tls/tls.key",
        }
        assert config_of(configmap)["grpc"]["listen"].startswith("0.0.0.0:")
    secrets = {
        v["secret"]["secretName"]
        for w in workloads(docs)
        for v in w["spec"]["template"]["spec"]["volumes"]
        if "secret" in v
    }
    assert secrets == {"reconciler-manager-tls", "reconciler-daemon-tls"}


def test_insecure_development_mode_keeps_every_listener_on_loopback() -> None:
    docs = objects(render(ci_values("insecure-dev")))
    for configmap in (d for d in docs if d["kind"] == "ConfigMap"):
        config = config_of(configmap)
        assert config["tls"]["mode"] == "insecure"
        assert config["grpc"]["listen"].startswith("127.0.0.1:")
        if "manager" in config:
            assert config["manager"]["address"] == "", "nothing can reach a loopback Manager"
    for workload in workloads(docs):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            assert "RECONCILER_GRPC__ADVERTISE_ADDRESS" not in container_env(container)
    assert not any(
        "secret" in v for w in workloads(docs) for v in w["spec"]["template"]["spec"]["volumes"]
    )


def test_a_workload_chart_adds_the_daemon_sidecar_with_the_named_templates(
    tmp_path: Path,
) -> None:
    parent = tmp_path / "shipper"
    (parent / "templates").mkdir(parents=True)
    (parent / "charts").mkdir()
    shutil.copytree(CHART_DIR, parent / "charts" / "reconciler")
    (parent / "Chart.yaml").write_text(
        "apiVersion: v2\nname: shipper\nversion: 1.0.0\n"
        "dependencies:\n  - name: reconciler\n    version: 0.1.0\n"
    )
    (parent / "values.yaml").write_text(
        "reconciler:\n  manager: {enabled: false}\n"
        "  tls: {daemonSecretName: node-tls}\n  sidecar: {agentId: shipper}\n"
    )
    (parent / "templates" / "deployment.yaml").write_text(USER_WORKLOAD)
    with helm_python.Chart.load(parent) as chart:
        rendered = chart.render(values={}, name="ship", namespace="apps")
    docs = objects(rendered)
    for doc in docs:
        validate_object(doc)
    pod = find(docs, "Deployment", "ship-shipper")["spec"]["template"]["spec"]
    names = [c["name"] for c in pod["containers"]]
    assert names == ["shipper", "reconciler-daemon"]
    assert env_of(pod["containers"][0])["RECONCILER_AGENT_ID"] == "shipper"
    config_name = {v["name"]: v for v in pod["volumes"]}["reconciler-daemon-config"]
    assert find(docs, "ConfigMap", config_name["configMap"]["name"])
    assert config_of(find(docs, "ConfigMap", "-daemon-sidecar"))["manager"]["address"] == ""


USER_WORKLOAD = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Release.Name }}-shipper
spec:
  selector:
    matchLabels: {app: shipper}
  template:
    metadata:
      labels: {app: shipper}
    spec:
      securityContext:
        runAsNonRoot: true
        runAsUser: 10001
        fsGroup: 10001
      containers:
        - name: shipper
          image: registry.example/shipper:1.4.2
          command: ["agentlet", "run", "--", "/usr/bin/shipper"]
          env:
            {{- include "reconciler.agentEnv" .Subcharts.reconciler | nindent 12 }}
          volumeMounts:
            {{- include "reconciler.agentVolumeMounts" .Subcharts.reconciler | nindent 12 }}
        {{- include "reconciler.daemonSidecar" .Subcharts.reconciler | nindent 8 }}
      volumes:
        {{- include "reconciler.daemonSidecarVolumes" .Subcharts.reconciler | nindent 8 }}
"""
