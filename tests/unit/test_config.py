"""Settings loading: hostile files are refused quickly and precisely, layers apply in
order, and printed settings hide secrets."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from reconciler.config import (
    MAX_FILE_BYTES,
    BackoffSettings,
    ConfigError,
    DaemonSettings,
    ManagerSettings,
    Role,
    StoreBackend,
    TlsMode,
    env_names,
    infer_role,
    is_loopback_host,
    load_daemon_settings,
    load_manager_settings,
    parse_advertised,
    parse_host_port,
    redact_dsn,
    settings_to_dict,
)
from reconciler.logs import LogLevel

REPO = Path(__file__).resolve().parents[2]

BILLION_LAUGHS = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def write(tmp_path: Path, text: str, name: str = "settings.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def refusal(path: Path) -> tuple[ConfigError, float]:
    """Load ``path`` as daemon settings; the error it raises and how long it took."""
    started = time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        load_daemon_settings(path, env={})
    return caught.value, time.perf_counter() - started


# ----------------------------------------------------------------- hostile files


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        pytest.param(
            "grpc:\n  listne: x\n", "grpc.listne", ["unknown setting", "listen"], id="unknown-key"
        ),
        pytest.param("colour: blue\n", "colour", ["unknown setting"], id="unknown-top-level-key"),
        pytest.param(
            "grpc:\n  max_message_bytes: true\n",
            "grpc.max_message_bytes",
            ["expected an integer", "got a boolean"],
            id="bool-is-not-an-int",
        ),
        pytest.param(
            "grpc:\n  max_concurrent_rpcs: '100'\n",
            "grpc.max_concurrent_rpcs",
            ["expected an integer", "got a string"],
            id="string-is-not-coerced",
        ),
        pytest.param(
            "node:\n  id: 42\n",
            "node.id",
            ["expected a string", "got an integer"],
            id="int-is-not-a-string",
        ),
        pytest.param(
            "tls:\n  mode: sometimes\n",
            "tls.mode",
            ["one of insecure, mtls"],
            id="enum-outside-choices",
        ),
        pytest.param(
            "agents:\n  allowed_commands: [/bin/*, 3]\n",
            "agents.allowed_commands[1]",
            ["expected a string"],
            id="list-item-wrong-type",
        ),
        pytest.param("grpc: 7070\n", "grpc", ["expected a mapping"], id="section-given-a-scalar"),
    ],
)
def test_a_bad_key_or_type_is_refused_naming_key_and_file(
    tmp_path: Path, text: str, key: str, words: list[str]
) -> None:
    path = write(tmp_path, text)
    error, elapsed_s = refusal(path)
    assert error.key == key
    assert error.file == str(path)
    assert str(error).startswith(f"{path}: {key}: ")
    for word in words:
        assert word in str(error)
    assert elapsed_s < 0.1


def test_a_billion_laughs_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, BILLION_LAUGHS)
    error, elapsed_s = refusal(path)
    assert error.file == str(path)
    assert "anchors are not allowed" in str(error)
    assert "line 1" in str(error)
    assert elapsed_s < 0.1


def test_an_alias_without_a_preceding_anchor_is_refused(tmp_path: Path) -> None:
    error, _ = refusal(write(tmp_path, "state_dir: *somewhere\n"))
    assert "not valid YAML" in str(error) or "aliases are not allowed" in str(error)


def test_a_python_object_tag_is_refused_naming_the_tag_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'state_dir: !!python/object/apply:os.system ["touch pwned"]\n')
    error, elapsed_s = refusal(path)
    assert error.file == str(path)
    assert str(path) in str(error)
    assert "!!python/object/apply:os.system" in str(error)
    assert not (tmp_path / "pwned").exists()
    assert elapsed_s < 0.1


def test_a_file_over_one_mebibyte_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = write(tmp_path, "state_dir: " + "x" * MAX_FILE_BYTES + "\n")
    error, elapsed_s = refusal(path)
    assert error.file == str(path)
    assert "1 MiB" in str(error)
    assert elapsed_s < 0.1


def test_a_file_of_exactly_one_mebibyte_is_read(tmp_path: Path) -> None:
    prefix = "state_dir: /x\n#"
    path = write(tmp_path, prefix + "x" * (MAX_FILE_BYTES - len(prefix) - 1) + "\n")
    assert path.stat().st_size == MAX_FILE_BYTES
    assert load_daemon_settings(path, env={}).state_dir == "/x"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        pytest.param(
            "grpc:\n  listen: a\n  listen: b\n", "duplicate key 'listen'", id="duplicate-key"
        ),
        pytest.param("[1, 2]\n", "top level must be a mapping", id="top-level-list"),
        pytest.param(
            "state_dir: " + "[" * 40 + "]" * 40 + "\n", "nesting deeper", id="deep-nesting"
        ),
        pytest.param("grpc: {listen: \n", "not valid YAML", id="broken-yaml"),
        pytest.param("a: 1\n---\nb: 2\n", "not valid YAML", id="two-documents"),
        pytest.param("state_dir: !custom x\n", "YAML tag !custom is not allowed", id="local-tag"),
    ],
)
def test_malformed_yaml_is_refused_with_the_reason(tmp_path: Path, text: str, words: str) -> None:
    path = write(tmp_path, text)
    error, _ = refusal(path)
    assert error.file == str(path)
    assert words in str(error)


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"state_dir: /caf\xe9\n")
    error, _ = refusal(path)
    assert "not UTF-8" in str(error)


def test_a_missing_file_is_refused_naming_it(tmp_path: Path) -> None:
    error, _ = refusal(tmp_path / "absent.yaml")
    assert error.file == str(tmp_path / "absent.yaml")
    assert "cannot read" in str(error)


def test_a_directory_is_not_a_settings_file(tmp_path: Path) -> None:
    error, _ = refusal(tmp_path)
    assert "not a regular file" in str(error)


# ----------------------------------------------------------------- accepted files


def test_no_file_and_no_environment_gives_the_documented_defaults() -> None:
    assert load_daemon_settings(None, env={}) == DaemonSettings()
    assert load_manager_settings(None, env={}) == ManagerSettings()


def test_the_manager_defaults_differ_where_the_contract_says() -> None:
    manager = ManagerSettings()
    assert manager.grpc.listen == "127.0.0.1:7060"
    assert manager.metrics.listen == "127.0.0.1:9460"
    assert DaemonSettings().metrics.listen == "127.0.0.1:9470"


def test_an_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_daemon_settings(write(tmp_path, "# nothing\n"), env={}) == DaemonSettings()


def test_a_section_whose_keys_are_all_commented_out_keeps_its_defaults(tmp_path: Path) -> None:
    settings = load_daemon_settings(write(tmp_path, "backoff:\n  # max_s: 5\n"), env={})
    assert settings.backoff == BackoffSettings()


def test_an_integer_is_accepted_for_a_duration_and_becomes_a_float(tmp_path: Path) -> None:
    settings = load_daemon_settings(write(tmp_path, "backoff:\n  max_s: 30\n"), env={})
    assert settings.backoff.max_s == 30.0
    assert isinstance(settings.backoff.max_s, float)


def test_a_file_sets_only_the_keys_it_names(tmp_path: Path) -> None:
    path = write(tmp_path, "grpc:\n  max_concurrent_rpcs: 7\nnode:\n  labels: {role: edge}\n")
    settings = load_daemon_settings(path, env={})
    assert settings.grpc.max_concurrent_rpcs == 7
    assert settings.grpc.listen == "127.0.0.1:7070"
    assert dict(settings.node.labels) == {"role": "edge"}


def test_settings_are_frozen() -> None:
    settings = DaemonSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.state_dir = "/tmp"  # type: ignore[misc]
    with pytest.raises(TypeError):
        settings.node.labels["x"] = "y"  # type: ignore[index]


@pytest.mark.parametrize(
    ("name", "role"),
    [
        pytest.param("daemon.yaml", Role.DAEMON, id="daemon"),
        pytest.param("manager.yaml", Role.MANAGER, id="manager"),
    ],
)
def test_the_example_files_are_valid_and_their_role_is_inferred(name: str, role: Role) -> None:
    path = REPO / "examples" / name
    assert infer_role(path) is role
    loader = load_daemon_settings if role is Role.DAEMON else load_manager_settings
    loader(path, env={})


# ----------------------------------------------------------------- sense checks


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        pytest.param(
            ["backoff.initial_s=120"],
            "backoff.initial_s",
            "greater than backoff.max_s",
            id="backoff-order",
        ),
        pytest.param(
            ["monitor.interval_s=0"], "monitor.interval_s", "greater than 0", id="zero-duration"
        ),
        pytest.param(
            ["manager.call_timeout_s=-1"],
            "manager.call_timeout_s",
            "greater than 0",
            id="negative-duration",
        ),
        pytest.param(["backoff.max_s=.nan"], "backoff.max_s", "finite", id="nan"),
        pytest.param(
            ["heartbeat.http_workers=0"], "heartbeat.http_workers", "at least 1", id="zero-count"
        ),
        pytest.param(
            ["agents.log_backups=-1"], "agents.log_backups", "at least 0", id="negative-backups"
        ),
        pytest.param(
            ["grpc.max_message_bytes=4294967296"],
            "grpc.max_message_bytes",
            "at most",
            id="huge-int",
        ),
        pytest.param(
            ["tls.mode=mtls"],
            "tls.mode",
            "mtls needs tls.ca_file, tls.cert_file, tls.key_file",
            id="mtls-files",
        ),
        pytest.param(
            ["grpc.listen=0.0.0.0:7070"],
            "grpc.listen",
            "not a loopback address",
            id="insecure-wildcard",
        ),
        pytest.param(
            ["grpc.listen=10.1.2.3:7070"],
            "grpc.listen",
            "not a loopback address",
            id="insecure-lan",
        ),
        pytest.param(["grpc.listen=7070"], "grpc.listen", "host:port", id="listen-without-host"),
        pytest.param(
            ["metrics.listen=127.0.0.1:99999"], "metrics.listen", "port", id="port-out-of-range"
        ),
        pytest.param(["manager.address=manager:http"], "manager.address", "port", id="named-port"),
        pytest.param(
            ["agents.allowed_commands=[python3]"],
            "agents.allowed_commands[0]",
            "absolute",
            id="relative-pattern",
        ),
        pytest.param(["node.id=-bad id"], "node.id", "not a valid node id", id="bad-node-id"),
        pytest.param(
            ["monitor.retention_s=1"],
            "monitor.retention_s",
            "less than monitor.interval_s",
            id="retention",
        ),
        pytest.param(
            ["telemetry.otlp_endpoint=collector:4317"],
            "telemetry.otlp_endpoint",
            "http(s) URL",
            id="otlp-url",
        ),
        pytest.param(["state_dir="], "state_dir", "must not be empty", id="empty-state-dir"),
        pytest.param(
            ["grpc.advertise_address=pod ip"],
            "grpc.advertise_address",
            "is not a host",
            id="advertise-garbage",
        ),
        pytest.param(
            ["grpc.advertise_address=[10.0.0.5]:7070"],
            "grpc.advertise_address",
            "[address]:port",
            id="advertise-bracketed-v4",
        ),
        pytest.param(
            ["grpc.listen=", "grpc.unix_socket=/run/d.sock", "grpc.advertise_address=10.0.0.5"],
            "grpc.advertise_address",
            "no listen port",
            id="advertise-without-a-port",
        ),
    ],
)
def test_values_that_make_no_sense_are_refused(overrides: list[str], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_daemon_settings(None, env={}, overrides=overrides)
    assert caught.value.key == key
    assert words in str(caught.value)


def test_a_problem_caused_by_a_default_names_the_file_being_loaded(tmp_path: Path) -> None:
    path = write(tmp_path, "store:\n  backend: postgres\n")
    with pytest.raises(ConfigError) as caught:
        load_manager_settings(path, env={})
    assert caught.value.key == "store.backend"
    assert caught.value.file == str(path)
    assert "postgres needs store.postgres_dsn" in str(caught.value)


def test_mtls_may_listen_on_every_interface() -> None:
    overrides = [
        "tls.mode=mtls",
        "tls.ca_file=ca.pem",
        "tls.cert_file=node.pem",
        "tls.key_file=node-key.pem",
        "grpc.listen=0.0.0.0:7070",
    ]
    settings = load_daemon_settings(None, env={}, overrides=overrides)
    assert settings.tls.mode is TlsMode.MTLS


@pytest.mark.parametrize(
    "listen",
    [
        pytest.param("127.0.0.1:7070", id="ipv4"),
        pytest.param("127.0.0.2:0", id="ipv4-port-0"),
        pytest.param("[::1]:7070", id="ipv6"),
        pytest.param("localhost:7070", id="localhost"),
    ],
)
def test_insecure_mode_may_listen_on_loopback(listen: str) -> None:
    settings = load_daemon_settings(None, env={}, overrides=[f"grpc.listen={listen}"])
    assert settings.grpc.listen == listen


def test_an_empty_daemon_listen_disables_tcp_but_the_manager_needs_one() -> None:
    assert load_daemon_settings(None, env={}, overrides=["grpc.listen="]).grpc.listen == ""
    with pytest.raises(ConfigError) as caught:
        load_manager_settings(None, env={}, overrides=["grpc.listen="])
    assert caught.value.key == "grpc.listen"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("127.0.0.1:7060", ("127.0.0.1", 7060), id="ipv4"),
        pytest.param("[::1]:7060", ("::1", 7060), id="ipv6"),
        pytest.param("manager.example.org:443", ("manager.example.org", 443), id="dns-name"),
    ],
)
def test_host_port_parses(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("::1:7060", id="bare-ipv6"),
        pytest.param("[::1]7060", id="bracket-without-colon"),
        pytest.param(":7060", id="no-host"),
        pytest.param("host:", id="no-port"),
        pytest.param("host:-1", id="negative-port"),
        pytest.param("ho st:1", id="space-in-host"),
    ],
)
def test_malformed_host_port_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_host_port(text)


def test_only_loopback_hosts_count_as_loopback() -> None:
    assert [is_loopback_host(h) for h in ("127.0.0.1", "::1", "LOCALHOST", "0.0.0.0", "db")] == [
        True,
        True,
        True,
        False,
        False,
    ]


# ----------------------------------------------------------------- environment and --set


def test_environment_variables_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "grpc:\n  max_concurrent_rpcs: 7\nstate_dir: /from/file\n")
    env = {"RECONCILER_GRPC__MAX_CONCURRENT_RPCS": "9", "RECONCILER_STATE_DIR": "/from/env"}
    settings = load_daemon_settings(path, env=env)
    assert settings.grpc.max_concurrent_rpcs == 9
    assert settings.state_dir == "/from/env"


def test_set_overrides_the_environment_and_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "backoff:\n  max_s: 10\n")
    env = {"RECONCILER_BACKOFF__MAX_S": "20"}
    settings = load_daemon_settings(path, env=env, overrides=["backoff.max_s=30"])
    assert settings.backoff.max_s == 30.0


def test_later_set_texts_win_over_earlier_ones() -> None:
    settings = load_daemon_settings(None, env={}, overrides=["node.id=a", "node.id=b"])
    assert settings.node.id == "b"


def test_environment_names_that_match_no_setting_are_ignored() -> None:
    env = {
        "RECONCILER_MANAGER": "10.0.0.1:1",
        "RECONCILER_AGENT_ID": "x",
        "RECONCILER_GRPC__NOPE": "1",
    }
    assert load_daemon_settings(None, env=env) == DaemonSettings()


def test_environment_names_follow_the_section_double_underscore_field_rule() -> None:
    names = env_names(DaemonSettings)
    assert names["RECONCILER_GRPC__LISTEN"] == "grpc.listen"
    assert names["RECONCILER_STATE_DIR"] == "state_dir"
    assert "RECONCILER_MANAGER" not in names
    assert env_names(ManagerSettings)["RECONCILER_STORE__POSTGRES_DSN"] == "store.postgres_dsn"


def test_a_string_setting_takes_the_environment_text_verbatim() -> None:
    dsn = "host=db password=a#b: c"
    env = {"RECONCILER_NODE__ID": "0042", "RECONCILER_STORE__POSTGRES_DSN": dsn}
    assert load_daemon_settings(None, env=env).node.id == "0042"
    assert load_manager_settings(None, env=env).store.postgres_dsn == dsn


def test_other_settings_parse_the_environment_text_as_yaml() -> None:
    env = {
        "RECONCILER_HEARTBEAT__ALLOW_UNMANAGED": "true",
        "RECONCILER_AGENTS__ALLOWED_COMMANDS": "[/usr/bin/*, /opt/agents/*]",
        "RECONCILER_NODE__LABELS": "{role: edge, zone: a}",
        "RECONCILER_LOGGING__LEVEL": "debug",
    }
    settings = load_daemon_settings(None, env=env)
    assert settings.heartbeat.allow_unmanaged is True
    assert settings.agents.allowed_commands == ("/usr/bin/*", "/opt/agents/*")
    assert dict(settings.node.labels) == {"role": "edge", "zone": "a"}
    assert settings.logging.level is LogLevel.DEBUG


def test_a_wrongly_typed_environment_value_names_the_variable_and_key() -> None:
    with pytest.raises(ConfigError) as caught:
        load_daemon_settings(None, env={"RECONCILER_HEARTBEAT__HTTP_WORKERS": "many"})
    assert caught.value.key == "heartbeat.http_workers"
    assert caught.value.file is None
    assert "RECONCILER_HEARTBEAT__HTTP_WORKERS" in str(caught.value)
    assert "expected an integer, got a string" in str(caught.value)


def test_an_environment_value_may_not_smuggle_in_an_alias_or_tag() -> None:
    for text in ("[&a x, *a]", "!!python/object/apply:os.system [true]"):
        with pytest.raises(ConfigError):
            load_daemon_settings(None, env={"RECONCILER_AGENTS__ALLOWED_COMMANDS": text})


def test_set_may_add_one_label_to_those_from_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "node:\n  labels: {role: edge}\n")
    settings = load_daemon_settings(path, env={}, overrides=["node.labels.zone=b"])
    assert dict(settings.node.labels) == {"role": "edge", "zone": "b"}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        pytest.param("grpc.listne=x", "grpc.listne: unknown setting", id="unknown-key"),
        pytest.param("grpc=x", "names a section", id="section"),
        pytest.param("grpc.listen.port=1", "grpc.listen is not a section", id="too-deep"),
        pytest.param("grpc.listen", "expected section.field=value", id="no-equals"),
        pytest.param("backoff.max_s=soon", "expected a number, got a string", id="wrong-type"),
    ],
)
def test_a_bad_set_text_is_refused_naming_it(text: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_daemon_settings(None, env={}, overrides=[text])
    assert str(caught.value).startswith("--set: ")
    assert words in str(caught.value)


# ----------------------------------------------------------------- printing


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        pytest.param(
            "postgresql://app:s3cret@db:5432/rec", "postgresql://app:***@db:5432/rec", id="url"
        ),
        pytest.param(
            "host=db user=app password=s3cret", "host=db user=app password=***", id="key-value"
        ),
        pytest.param(
            "host=db password='s3 cret' user=app", "host=db password=*** user=app", id="quoted"
        ),
        pytest.param(
            "postgresql://db/rec?password=s3cret&x=1",
            "postgresql://db/rec?password=***&x=1",
            id="query",
        ),
        pytest.param("postgresql://app@db/rec", "postgresql://app@db/rec", id="no-password"),
    ],
)
def test_dsn_passwords_are_redacted(dsn: str, shown: str) -> None:
    assert redact_dsn(dsn) == shown


def test_an_error_about_a_set_text_does_not_repeat_its_value() -> None:
    with pytest.raises(ConfigError) as caught:
        load_manager_settings(
            None, env={}, overrides=["store.postgres_dsn.x=postgresql://a:pw@db/x"]
        )
    assert "pw" not in str(caught.value)


def test_printed_settings_are_plain_data_with_the_dsn_password_hidden() -> None:
    env = {
        "RECONCILER_STORE__BACKEND": "postgres",
        "RECONCILER_STORE__POSTGRES_DSN": "postgresql://app:s3cret@db/rec",
    }
    settings = load_manager_settings(None, env=env)
    assert settings.store.backend is StoreBackend.POSTGRES
    shown = settings_to_dict(settings)
    assert shown["store"] == {
        "backend": "postgres",
        "sqlite_path": "",
        "postgres_dsn": "postgresql://app:***@db/rec",
        "pool_size": 10,
    }
    assert "s3cret" not in repr(shown)
    assert settings_to_dict(settings, redact=False)["store"]["postgres_dsn"].endswith(
        "s3cret@db/rec"
    )


def test_printed_settings_load_back_to_the_same_settings(tmp_path: Path) -> None:
    import yaml

    original = load_daemon_settings(REPO / "examples" / "daemon.yaml", env={})
    path = write(tmp_path, yaml.safe_dump(settings_to_dict(original)))
    assert load_daemon_settings(path, env={}) == original


# ----------------------------------------------------------------- documentation


def _dotted_keys(cls: type, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for field in dataclasses.fields(cls):
        default = getattr(cls(), field.name)
        if dataclasses.is_dataclass(default):
            keys.extend(_dotted_keys(type(default), f"{prefix}{field.name}."))
        else:
            keys.append(f"{prefix}{field.name}")
    return keys


@pytest.mark.parametrize(
    "cls", [pytest.param(DaemonSettings, id="daemon"), pytest.param(ManagerSettings, id="manager")]
)
def test_every_setting_is_documented_and_in_the_example(cls: type) -> None:
    docs = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    example = (
        REPO / "examples" / f"{cls.__name__.removesuffix('Settings').lower()}.yaml"
    ).read_text()
    for key in _dotted_keys(cls):
        assert f"`{key}`" in docs, key
        assert f"{key.rpartition('.')[2]}:" in example, key


def test_a_duration_below_one_second_is_accepted() -> None:
    settings = load_daemon_settings(
        None, env={}, overrides=["backoff.initial_s=0.2", "manager.heartbeat_interval_s=0.5"]
    )
    assert settings.backoff.initial_s == 0.2
    assert settings.manager.heartbeat_interval_s == 0.5


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.5", ("10.0.0.5", 7070)),
        ("10.0.0.5:9000", ("10.0.0.5", 9000)),
        ("daemon-0.daemons.ns.svc", ("daemon-0.daemons.ns.svc", 7070)),
        ("fd00::5", ("fd00::5", 7070)),
        ("[fd00::5]:9000", ("fd00::5", 9000)),
    ],
)
def test_an_advertised_address_may_leave_out_the_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_advertised(text, default_port=7070) == expected
    settings = load_daemon_settings(None, env={"RECONCILER_GRPC__ADVERTISE_ADDRESS": text})
    assert settings.grpc.advertise_address == text
