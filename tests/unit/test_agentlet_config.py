"""AgentletConfig.from_env: the agent environment, validated, errors naming the variable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agentlet.config import (
    DEFAULT_INTERVAL_S,
    AgentletConfig,
    ConfigError,
    ListenAddress,
    load_agent_config,
    parse_listen,
)

SOCKET_ENV = {
    "RECONCILER_AGENT_ID": "web-1",
    "RECONCILER_HEARTBEAT_SOCKET": "/run/reconciler/heartbeat.sock",
}


def test_a_full_environment_is_read_into_the_config() -> None:
    config = AgentletConfig.from_env(
        {
            **SOCKET_ENV,
            "RECONCILER_AGENT_TOKEN": "s3cret",
            "RECONCILER_HEARTBEAT_URL": "http://127.0.0.1:7071/heartbeat",
            "RECONCILER_HEARTBEAT_INTERVAL_S": "2.5",
            "RECONCILER_AGENT_VERSION": "1.2.3",
            "RECONCILER_AGENT_CONFIG_FILE": "/etc/agent.json",
            "TRACEPARENT": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "AGENTLET_HTTP_LISTEN": "127.0.0.1:9000",
        }
    )
    assert config.agent_id == "web-1"
    assert config.token == "s3cret"
    assert config.heartbeat_socket == "/run/reconciler/heartbeat.sock"
    assert config.heartbeat_url == "http://127.0.0.1:7071/heartbeat"
    assert config.interval_s == 2.5
    assert config.version == "1.2.3"
    assert config.config_file == "/etc/agent.json"
    assert config.traceparent == "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert config.http_listen == ListenAddress("127.0.0.1", 9000)
    assert config.heartbeats_enabled


def test_an_empty_environment_runs_standalone_with_defaults() -> None:
    config = AgentletConfig.from_env({})
    assert not config.heartbeats_enabled
    assert config.agent_id is None
    assert config.interval_s == DEFAULT_INTERVAL_S
    assert config.http_listen is None


def test_an_agent_id_without_a_receiver_turns_heartbeats_off() -> None:
    assert not AgentletConfig.from_env({"RECONCILER_AGENT_ID": "a"}).heartbeats_enabled


def test_the_token_never_appears_in_the_repr() -> None:
    config = AgentletConfig.from_env({**SOCKET_ENV, "RECONCILER_AGENT_TOKEN": "s3cret"})
    assert "s3cret" not in repr(config)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        pytest.param(
            {**SOCKET_ENV, "RECONCILER_AGENT_ID": "-bad"},
            "RECONCILER_AGENT_ID",
            id="id-leading-dash",
        ),
        pytest.param(
            {**SOCKET_ENV, "RECONCILER_AGENT_ID": "a" * 64}, "RECONCILER_AGENT_ID", id="id-too-long"
        ),
        pytest.param(
            {"RECONCILER_HEARTBEAT_SOCKET": "/s.sock"},
            "RECONCILER_AGENT_ID",
            id="socket-without-id",
        ),
        pytest.param(
            {**SOCKET_ENV, "RECONCILER_HEARTBEAT_INTERVAL_S": "fast"},
            "RECONCILER_HEARTBEAT_INTERVAL_S",
            id="interval-not-a-number",
        ),
        pytest.param(
            {**SOCKET_ENV, "RECONCILER_HEARTBEAT_INTERVAL_S": "nan"},
            "RECONCILER_HEARTBEAT_INTERVAL_S",
            id="interval-nan",
        ),
        pytest.param(
            {**SOCKET_ENV, "RECONCILER_HEARTBEAT_INTERVAL_S": "0"},
            "RECONCILER_HEARTBEAT_INTERVAL_S",
            id="interval-zero",
        ),
        pytest.param(
            {**SOCKET_ENV, "RECONCILER_HEARTBEAT_INTERVAL_S": "-1"},
            "RECONCILER_HEARTBEAT_INTERVAL_S",
            id="interval-negative",
        ),
        pytest.param(
            {**SOCKET_ENV, "RECONCILER_HEARTBEAT_SOCKET": "@abstract"},
            "RECONCILER_HEARTBEAT_SOCKET",
            id="abstract-socket",
        ),
        pytest.param(
            {**SOCKET_ENV, "RECONCILER_HEARTBEAT_SOCKET": "/" + "s" * 120},
            "RECONCILER_HEARTBEAT_SOCKET",
            id="socket-path-too-long",
        ),
        pytest.param(
            {
                "RECONCILER_AGENT_ID": "a",
                "RECONCILER_HEARTBEAT_URL": "ftp://h/x",
                "RECONCILER_AGENT_TOKEN": "t",
            },
            "RECONCILER_HEARTBEAT_URL",
            id="url-bad-scheme",
        ),
        pytest.param(
            {
                "RECONCILER_AGENT_ID": "a",
                "RECONCILER_HEARTBEAT_URL": "http://h:99999/x",
                "RECONCILER_AGENT_TOKEN": "t",
            },
            "RECONCILER_HEARTBEAT_URL",
            id="url-bad-port",
        ),
        pytest.param(
            {
                "RECONCILER_AGENT_ID": "a",
                "RECONCILER_HEARTBEAT_URL": "http://127.0.0.1:7071/heartbeat",
            },
            "RECONCILER_AGENT_TOKEN",
            id="http-without-token",
        ),
        pytest.param(
            {**SOCKET_ENV, "RECONCILER_AGENT_TOKEN": "a\nb"},
            "RECONCILER_AGENT_TOKEN",
            id="token-with-newline",
        ),
        pytest.param(
            {**SOCKET_ENV, "RECONCILER_AGENT_VERSION": "v" * 129},
            "RECONCILER_AGENT_VERSION",
            id="version-too-long",
        ),
        pytest.param(
            {**SOCKET_ENV, "RECONCILER_AGENT_VERSION": "1\x00"},
            "RECONCILER_AGENT_VERSION",
            id="version-unprintable",
        ),
        pytest.param(
            {**SOCKET_ENV, "AGENTLET_HTTP_LISTEN": "127.0.0.1:http"},
            "AGENTLET_HTTP_LISTEN",
            id="listen-bad-port",
        ),
        pytest.param(
            {**SOCKET_ENV, "AGENTLET_HTTP_LISTEN": "bad host:80"},
            "AGENTLET_HTTP_LISTEN",
            id="listen-bad-host",
        ),
    ],
)
def test_a_bad_variable_is_an_error_naming_it(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as caught:
        AgentletConfig.from_env(env)
    assert caught.value.variable == variable
    assert str(caught.value).startswith(variable)


def test_a_malformed_traceparent_is_dropped_rather_than_fatal() -> None:
    config = AgentletConfig.from_env({**SOCKET_ENV, "TRACEPARENT": "not-a-trace"})
    assert config.traceparent is None


def test_empty_variables_count_as_unset() -> None:
    config = AgentletConfig.from_env(
        {**SOCKET_ENV, "RECONCILER_HEARTBEAT_URL": "", "AGENTLET_HTTP_LISTEN": ""}
    )
    assert config.heartbeat_url is None
    assert config.http_listen is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("8080", ListenAddress("127.0.0.1", 8080), id="port-only-is-loopback"),
        pytest.param(":8080", ListenAddress("127.0.0.1", 8080), id="empty-host-is-loopback"),
        pytest.param("0.0.0.0:80", ListenAddress("0.0.0.0", 80), id="ipv4"),
        pytest.param("[::1]:9000", ListenAddress("::1", 9000), id="ipv6-bracketed"),
        pytest.param("localhost:0", ListenAddress("localhost", 0), id="name-and-port-zero"),
    ],
)
def test_listen_addresses_parse(text: str, expected: ListenAddress) -> None:
    assert parse_listen(text) == expected


def test_an_ipv6_listen_address_prints_with_brackets() -> None:
    assert str(ListenAddress("::1", 9000)) == "[::1]:9000"


def test_the_agent_config_file_is_read_as_a_json_object(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"threads": 4}))
    assert load_agent_config(str(path)) == {"threads": 4}


@pytest.mark.parametrize(
    "content",
    [
        pytest.param("[1, 2]", id="not-an-object"),
        pytest.param("{", id="not-json"),
        pytest.param(" " * (1024 * 1024 + 1), id="too-large"),
    ],
)
def test_a_bad_agent_config_file_is_an_error_naming_the_variable(
    tmp_path: Path, content: str
) -> None:
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as caught:
        load_agent_config(str(path))
    assert caught.value.variable == "RECONCILER_AGENT_CONFIG_FILE"


def test_a_missing_agent_config_file_is_an_error_naming_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="RECONCILER_AGENT_CONFIG_FILE"):
        load_agent_config(str(tmp_path / "absent.json"))
