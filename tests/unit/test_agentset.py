"""AgentSet files: parsing, refusals that name the path, and the shared validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.api.agent.v1 import agent_pb2
from reconciler.api.fleet.v1 import fleet_pb2
from reconciler.manager.agentset import (
    MAX_FILE_BYTES,
    AgentSetFileError,
    check_agent_set,
    load_agent_set_file,
    parse_agent_sets,
)
from reconciler.model import InvalidArgument

EXAMPLE = """\
apiVersion: reconciler/v1
kind: AgentSet
metadata:
  name: log-shippers
spec:
  nodeSelector:
    matchLabels: {role: edge}
    nodeIds: [node-1]
  agents:
    - id: shipper
      command: ["/usr/bin/python3", "-m", "shipper", "--fast"]
      version: "1.4.2"
      state: running
      restartPolicy: OnFailure
      env: {LOG_LEVEL: info}
      workingDir: /var/lib/shipper
      heartbeat: {intervalSeconds: 5, timeoutSeconds: 15}
      stopGracePeriodSeconds: 3
      config: {batch: 500, targets: [a, b], nested: {enabled: true}}
      labels: {team: obs}
      user: shipper
"""

MINIMAL = """\
apiVersion: reconciler/v1
kind: AgentSet
metadata: {name: minimal}
spec:
  agents:
    - id: sleeper
      command: [/bin/sleep, "60"]
"""


def test_the_design_example_parses_into_an_agent_set_message() -> None:
    (agent_set,) = parse_agent_sets(EXAMPLE)
    assert agent_set.metadata.name == "log-shippers"
    assert dict(agent_set.spec.node_selector.match_labels) == {"role": "edge"}
    assert list(agent_set.spec.node_selector.node_ids) == ["node-1"]
    agent = agent_set.spec.agents[0]
    assert list(agent.command) == ["/usr/bin/python3", "-m", "shipper", "--fast"]
    assert agent.state == agent_pb2.DESIRED_STATE_RUNNING
    assert agent.restart_policy == agent_pb2.RESTART_POLICY_ON_FAILURE
    assert agent.heartbeat.timeout_seconds == 15
    assert agent.stop_grace_period_seconds == 3
    assert agent.config["batch"] == 500
    assert list(agent.config["targets"]) == ["a", "b"]
    assert agent.user == "shipper"


def test_omitted_fields_take_the_model_defaults() -> None:
    (agent_set,) = parse_agent_sets(MINIMAL)
    agent = agent_set.spec.agents[0]
    assert agent.state == agent_pb2.DESIRED_STATE_RUNNING
    assert agent.restart_policy == agent_pb2.RESTART_POLICY_ALWAYS
    assert agent.stop_grace_period_seconds == 10.0
    assert not agent.HasField("heartbeat")
    assert not agent_set.spec.node_selector.match_labels


def test_several_documents_give_several_agent_sets() -> None:
    second = MINIMAL.replace("minimal", "second")
    sets = parse_agent_sets(f"{EXAMPLE}---\n{second}\n---\n")
    assert [s.metadata.name for s in sets] == ["log-shippers", "second"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            MINIMAL.replace("      command", "      restartPolicys: Always\n      command"),
            "spec.agents[0].restartPolicys: unknown field",
            id="unknown-agent-key",
        ),
        pytest.param(
            MINIMAL.replace("spec:", "spec:\n  replicas: 3"),
            "spec.replicas: unknown field",
            id="unknown-spec-key",
        ),
        pytest.param(
            MINIMAL.replace("metadata: {name: minimal}", "metadata: {name: minimal, labels: {}}"),
            "metadata.labels: unknown field",
            id="unknown-metadata-key",
        ),
        pytest.param(
            MINIMAL.replace("spec:", "spec:\n  nodeSelector: {matchLabel: {a: b}}"),
            "spec.nodeSelector.matchLabel: unknown field",
            id="unknown-selector-key",
        ),
        pytest.param(MINIMAL + "extra: 1\n", "extra: unknown field", id="unknown-top-level-key"),
        pytest.param(
            MINIMAL + "      restartPolicy: always\n",
            "spec.agents[0].restartPolicy: must be one of Always, OnFailure, Never",
            id="bad-restart-policy",
        ),
        pytest.param(
            MINIMAL + "      state: RUNNING\n",
            "spec.agents[0].state: must be one of running, stopped",
            id="bad-state",
        ),
        pytest.param(
            MINIMAL + "      version: 1.10\n",
            "spec.agents[0].version: expected a string, got a number",
            id="unquoted-version",
        ),
        pytest.param(
            MINIMAL + "      labels: {tier: 1}\n",
            "spec.agents[0].labels.tier: expected a string, got an integer",
            id="non-string-label",
        ),
        pytest.param(
            MINIMAL + "      config: {when: 2024-01-01}\n",
            "spec.agents[0].config.when: expected JSON data, got date",
            id="yaml-date-in-config",
        ),
        pytest.param(
            MINIMAL + "      stopGracePeriodSeconds: true\n",
            "spec.agents[0].stopGracePeriodSeconds: expected a number of seconds",
            id="boolean-duration",
        ),
        pytest.param(
            MINIMAL.replace('command: [/bin/sleep, "60"]', "command: /bin/sleep 60"),
            "spec.agents[0].command: expected a list of strings",
            id="command-as-a-string",
        ),
        pytest.param(
            MINIMAL.replace('command: [/bin/sleep, "60"]', "command: []"),
            "spec.agents[0].command: must not be empty",
            id="empty-command",
        ),
        pytest.param(
            MINIMAL + "      env: {LD_PRELOAD: /tmp/x.so}\n",
            "spec.agents[0].env[LD_PRELOAD]: may not be set",
            id="forbidden-env-from-the-model-rules",
        ),
        pytest.param(
            MINIMAL + "    - id: sleeper\n      command: [/bin/true]\n",
            "spec.agents[1].id: duplicate agent id 'sleeper'",
            id="duplicate-agent-id",
        ),
        pytest.param(
            MINIMAL.replace("name: minimal", "name: Bad_Name"),
            "metadata.name: 'Bad_Name' is not a valid AgentSet name",
            id="bad-name",
        ),
        pytest.param(
            MINIMAL.replace("kind: AgentSet", "kind: Deployment"),
            "kind: must be 'AgentSet'",
            id="wrong-kind",
        ),
        pytest.param(
            MINIMAL.replace("apiVersion: reconciler/v1", "apiVersion: apps/v1"),
            "apiVersion: must be 'reconciler/v1'",
            id="wrong-api-version",
        ),
        pytest.param(
            MINIMAL.replace("spec:", "spec:\n  nodeSelector: {nodeIds: ['bad node']}"),
            "spec.nodeSelector.nodeIds[0]: 'bad node' is not a node id",
            id="bad-node-id",
        ),
        pytest.param(
            "apiVersion: reconciler/v1\nkind: AgentSet\nmetadata: {name: x}\nspec: {}\n",
            "spec.agents: expected a list of agents, got null",
            id="no-agents",
        ),
    ],
)
def test_bad_documents_are_refused_naming_the_path(text: str, expected: str) -> None:
    with pytest.raises(AgentSetFileError) as caught:
        parse_agent_sets(text, source="set.yaml")
    assert str(caught.value).startswith("set.yaml: ")
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "base: &base {id: a}\nother: *base\n", "YAML anchors are not allowed", id="anchor"
        ),
        pytest.param("a: *nothing\n", "YAML aliases are not allowed", id="alias-without-anchor"),
        pytest.param("a: !!python/object {}\n", "YAML tags are not allowed", id="python-tag"),
        pytest.param("a: !!binary aGk=\n", "YAML tags are not allowed", id="binary-tag"),
        pytest.param("a: 1\na: 2\n", "duplicate key 'a'", id="duplicate-key"),
        pytest.param("a: [" * 40 + "]" * 40 + "\n", "nesting deeper", id="deep-nesting"),
        pytest.param("- just\n- a list\n", "expected a mapping, got a list", id="not-a-mapping"),
        pytest.param("", "holds no AgentSet", id="empty"),
    ],
)
def test_unsafe_or_malformed_yaml_is_refused(text: str, expected: str) -> None:
    with pytest.raises(AgentSetFileError) as caught:
        parse_agent_sets(text, source="set.yaml")
    assert expected in str(caught.value)


def test_an_error_in_a_later_document_names_the_document() -> None:
    bad = MINIMAL.replace("minimal", "second") + "      state: paused\n"
    with pytest.raises(AgentSetFileError) as caught:
        parse_agent_sets(f"{EXAMPLE}---\n{bad}", source="sets.yaml")
    assert str(caught.value).startswith("sets.yaml: document 2: spec.agents[0].state")


def test_two_documents_with_one_name_are_refused() -> None:
    with pytest.raises(AgentSetFileError, match="appears twice"):
        parse_agent_sets(f"{MINIMAL}---\n{MINIMAL}")


def test_a_file_over_one_mebibyte_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text("#" * (MAX_FILE_BYTES + 1))
    with pytest.raises(AgentSetFileError, match="larger than"):
        load_agent_set_file(path)


def test_a_missing_file_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(AgentSetFileError, match=r"missing\.yaml: cannot read"):
        load_agent_set_file(tmp_path / "missing.yaml")


def test_a_file_on_disk_loads(tmp_path: Path) -> None:
    path = tmp_path / "set.yaml"
    path.write_text(EXAMPLE)
    assert [s.metadata.name for s in load_agent_set_file(path)] == ["log-shippers"]


def test_the_manager_side_check_refuses_a_hostile_message_naming_the_field() -> None:
    (agent_set,) = parse_agent_sets(MINIMAL)
    agent_set.spec.agents[0].restart_policy = agent_pb2.RESTART_POLICY_UNSPECIFIED
    with pytest.raises(InvalidArgument) as caught:
        check_agent_set(agent_set)
    assert caught.value.field == "spec.agents[0].restartPolicy"


def test_the_check_fills_in_api_version_and_kind_and_drops_bookkeeping() -> None:
    message = fleet_pb2.AgentSet()
    message.metadata.name = "bare"
    message.metadata.revision = 42
    message.spec.agents.add(
        id="a",
        command=["/bin/true"],
        state=agent_pb2.DESIRED_STATE_STOPPED,
        restart_policy=agent_pb2.RESTART_POLICY_NEVER,
    )
    checked = check_agent_set(message)
    assert (checked.message.api_version, checked.message.kind) == ("reconciler/v1", "AgentSet")
    assert checked.message.metadata.revision == 0
    assert [a.id for a in checked.definition.agents] == ["a"]


def test_the_example_files_in_the_repository_are_valid() -> None:
    examples = sorted(Path(__file__).parents[2].glob("examples/agentsets/*.yaml"))
    assert examples, "examples/agentsets holds no AgentSet file"
    for path in examples:
        assert load_agent_set_file(path)
