"""The ``reconciler`` command tree: help everywhere, clean failures, ``config check``,
``version``, output formats, and how the Manager address is chosen."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from reconciler import __version__
from reconciler.cli.connection import (
    DEFAULT_MANAGER_ADDRESS,
    ResolvedAddress,
    client_config_path,
    resolve_manager_address,
)
from reconciler.cli.daemon_cmd import daemon_overrides
from reconciler.cli.main import cli, main
from reconciler.cli.options import parse_duration
from reconciler.cli.output import OutputFormat, flatten, print_records
from reconciler.config import ConfigError, load_daemon_settings, settings_to_dict

REPO = Path(__file__).resolve().parents[2]
DAEMON_EXAMPLE = str(REPO / "examples" / "daemon.yaml")
MANAGER_EXAMPLE = str(REPO / "examples" / "manager.yaml")


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(env={"RECONCILER_MANAGER": None, "XDG_CONFIG_HOME": "/nonexistent"})


def command_paths(command: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from command_paths(sub, (*path, name))


ALL_PATHS = list(command_paths(cli))


# ----------------------------------------------------------------- the tree


@pytest.mark.parametrize(
    "path", [pytest.param(p, id=" ".join(p) or "reconciler") for p in ALL_PATHS]
)
def test_every_command_answers_help(runner: CliRunner, path: tuple[str, ...]) -> None:
    result = runner.invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout


def test_the_top_level_help_lists_every_command_and_the_global_options(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["--help"])
    for name in (
        "dev", "daemon", "manager", "apply", "get", "describe", "delete",
        "agent", "metrics", "events", "config", "certs", "version",
    ):  # fmt: skip
        assert f"  {name} " in result.stdout, name
    assert "--log-format" in result.stdout
    assert "--log-level" in result.stdout


def test_the_agent_group_has_start_stop_restart_and_update() -> None:
    assert {p for p in ALL_PATHS if p[:1] == ("agent",)} == {
        ("agent",),
        ("agent", "start"),
        ("agent", "stop"),
        ("agent", "restart"),
        ("agent", "update"),
    }


def test_update_needs_a_version_and_a_daemon(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["agent", "update", "a1", "--daemon", "127.0.0.1:1"])
    assert result.exit_code == 2
    assert "Missing option '--version'" in result.stderr
    result = runner.invoke(cli, ["agent", "update", "a1", "--version", "2"])
    assert result.exit_code == 2
    assert "Missing option '--daemon'" in result.stderr


def test_node_and_daemon_together_are_a_usage_error(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["agent", "start", "a1", "--node", "n1", "--daemon", "127.0.0.1:1"])
    assert result.exit_code == 2
    assert "--node and --daemon cannot be used together" in result.stderr


def test_a_bad_duration_is_a_usage_error(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["metrics", "a1", "--since", "soon"])
    assert result.exit_code == 2
    assert "is not a duration" in result.stderr


def test_global_log_options_are_accepted(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["--log-format", "json", "--log-level", "debug", "version"])
    assert result.exit_code == 0


# ----------------------------------------------------------------- version


def test_version_prints_the_version(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["version"])
    assert result.stdout == f"reconciler {__version__}\n"


def test_version_prints_json_on_request(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["version", "-o", "json"])
    assert json.loads(result.stdout)["version"] == __version__


# ----------------------------------------------------------------- config check


@pytest.mark.parametrize(
    ("path", "section"),
    [
        pytest.param(DAEMON_EXAMPLE, "heartbeat", id="daemon-example"),
        pytest.param(MANAGER_EXAMPLE, "store", id="manager-example"),
    ],
)
def test_config_check_accepts_the_examples_and_prints_yaml(
    runner: CliRunner, path: str, section: str
) -> None:
    result = runner.invoke(cli, ["config", "check", path])
    assert result.exit_code == 0, result.stderr
    assert section in yaml.safe_load(result.stdout)


def test_config_check_prints_the_effective_settings_as_json(runner: CliRunner) -> None:
    result = runner.invoke(
        cli,
        ["config", "check", DAEMON_EXAMPLE, "--set", "backoff.max_s=90", "-o", "json"],
        env={"RECONCILER_GRPC__MAX_CONCURRENT_RPCS": "12"},
    )
    assert result.exit_code == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["backoff"]["max_s"] == 90.0
    assert shown["grpc"]["max_concurrent_rpcs"] == 12
    expected = settings_to_dict(
        load_daemon_settings(
            DAEMON_EXAMPLE,
            env={"RECONCILER_GRPC__MAX_CONCURRENT_RPCS": "12"},
            overrides=["backoff.max_s=90"],
        )
    )
    assert shown == expected


def test_config_check_prints_a_table_on_request(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["config", "check", DAEMON_EXAMPLE, "-o", "table"])
    assert result.exit_code == 0
    assert "grpc.listen" in result.stdout
    assert "127.0.0.1:7070" in result.stdout


def test_config_check_redacts_the_dsn_password(runner: CliRunner) -> None:
    env = {
        "RECONCILER_STORE__BACKEND": "postgres",
        "RECONCILER_STORE__POSTGRES_DSN": "postgresql://rec:hunter2@db/rec",
    }
    result = runner.invoke(cli, ["config", "check", MANAGER_EXAMPLE], env=env)
    assert result.exit_code == 0, result.stderr
    assert "hunter2" not in result.stdout
    assert "postgresql://rec:***@db/rec" in result.stdout


def test_config_check_reports_a_bad_file_in_one_line_and_exits_1(
    runner: CliRunner, tmp_path: Path
) -> None:
    path = tmp_path / "daemon.yaml"
    path.write_text("grpc:\n  listne: 127.0.0.1:1\n")
    result = runner.invoke(cli, ["config", "check", str(path)])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"{path}: grpc.listne: unknown setting")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.output


def test_config_check_infers_manager_from_manager_only_keys(
    runner: CliRunner, tmp_path: Path
) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text("push:\n  concurrency: 3\n")
    result = runner.invoke(cli, ["config", "check", str(path), "-o", "json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["push"]["concurrency"] == 3
    assert "valid manager settings" in result.stderr


def test_config_check_with_an_explicit_role_refuses_the_other_roles_keys(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["config", "check", MANAGER_EXAMPLE, "--role", "daemon"])
    assert result.exit_code == 1
    assert ": store: unknown setting" in result.stderr


# ----------------------------------------------------------------- main()


@pytest.mark.parametrize(
    ("args", "status", "stderr"),
    [
        pytest.param(["version"], 0, "", id="success"),
        pytest.param(
            ["agent", "restart", "a1", "--daemon", "127.0.0.1:1"],
            1,
            "UNAVAILABLE: cannot reach the daemon at 127.0.0.1:1",
            id="unreachable-daemon",
        ),
        pytest.param(
            ["config", "check", "/nonexistent/d.yaml"],
            1,
            "/nonexistent/d.yaml: cannot read",
            id="config-error",
        ),
        pytest.param(["frobnicate"], 2, "No such command", id="usage-error"),
    ],
)
def test_main_returns_the_status_and_prints_no_traceback(
    capsys: pytest.CaptureFixture[str], args: list[str], status: int, stderr: str
) -> None:
    assert main(args) == status
    err = capsys.readouterr().err
    assert stderr in err
    assert "Traceback" not in err


def test_main_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "Usage: reconciler" in capsys.readouterr().out


# ----------------------------------------------------------------- connection


@pytest.mark.parametrize(
    ("flag", "env", "file_text", "expected"),
    [
        pytest.param(
            "10.0.0.1:7060",
            {"RECONCILER_MANAGER": "10.0.0.2:7060"},
            "manager: 10.0.0.3:7060\n",
            ResolvedAddress("10.0.0.1:7060", "--manager"),
            id="flag-wins",
        ),
        pytest.param(
            None,
            {"RECONCILER_MANAGER": "10.0.0.2:7060"},
            "manager: 10.0.0.3:7060\n",
            ResolvedAddress("10.0.0.2:7060", "environment variable RECONCILER_MANAGER"),
            id="env-before-file",
        ),
        pytest.param(
            None,
            {},
            "manager: 10.0.0.3:7060\n",
            ResolvedAddress("10.0.0.3:7060", "{file}"),
            id="file-before-default",
        ),
        pytest.param(
            None, {}, None, ResolvedAddress(DEFAULT_MANAGER_ADDRESS, "default"), id="default"
        ),
        pytest.param(
            None,
            {},
            "# empty\n",
            ResolvedAddress(DEFAULT_MANAGER_ADDRESS, "default"),
            id="empty-file-means-default",
        ),
    ],
)
def test_the_manager_address_is_flag_then_env_then_client_file_then_default(
    tmp_path: Path,
    flag: str | None,
    env: dict[str, str],
    file_text: str | None,
    expected: ResolvedAddress,
) -> None:
    client_file = tmp_path / "client.yaml"
    if file_text is not None:
        client_file.write_text(file_text)
    resolved = resolve_manager_address(flag, env=env, client_file=client_file)
    assert resolved == ResolvedAddress(expected.address, expected.source.format(file=client_file))


def test_the_client_file_lives_under_xdg_config_home_or_dot_config() -> None:
    assert client_config_path({"XDG_CONFIG_HOME": "/x"}) == Path("/x/reconciler/client.yaml")
    assert client_config_path({"HOME": "/home/op"}) == Path(
        "/home/op/.config/reconciler/client.yaml"
    )


def test_the_client_file_is_found_through_the_environment(tmp_path: Path) -> None:
    (tmp_path / "reconciler").mkdir()
    (tmp_path / "reconciler" / "client.yaml").write_text("manager: mgr.example.org:7060\n")
    resolved = resolve_manager_address(None, env={"XDG_CONFIG_HOME": str(tmp_path)})
    assert resolved.address == "mgr.example.org:7060"


@pytest.mark.parametrize(
    ("flag", "file_text", "words"),
    [
        pytest.param("nonsense", None, "expected host:port", id="bad-flag"),
        pytest.param(None, "manager: [a]\n", "expected a string", id="file-wrong-type"),
        pytest.param(None, "managr: x:1\n", "unknown setting", id="file-unknown-key"),
        pytest.param(None, "manager: &a x:1\n", "anchors are not allowed", id="file-anchor"),
    ],
)
def test_a_malformed_manager_address_is_refused(
    tmp_path: Path, flag: str | None, file_text: str | None, words: str
) -> None:
    client_file = tmp_path / "client.yaml"
    if file_text is not None:
        client_file.write_text(file_text)
    with pytest.raises(ConfigError, match=words):
        resolve_manager_address(flag, env={}, client_file=client_file)


# ----------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("500ms", 0.5, id="ms"),
        pytest.param("120s", 120.0, id="s"),
        pytest.param("10m", 600.0, id="m"),
        pytest.param("1.5h", 5400.0, id="h"),
        pytest.param("1d", 86400.0, id="d"),
        pytest.param("30", 30.0, id="bare"),
    ],
)
def test_durations_parse_to_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0s", "-1s", "5 weeks", "1y", "400d"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_duration(text)


def test_named_daemon_flags_come_after_set_so_they_win() -> None:
    overrides = daemon_overrides(["node.id=a"], node_id="b", state_dir=None)
    assert overrides == ["node.id=a", "node.id=b"]
    assert load_daemon_settings(None, env={}, overrides=overrides).node.id == "b"


def test_records_print_as_table_json_and_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    rows = [
        {"name": "n1", "labels": {"role": "edge"}, "ready": True},
        {"name": "n2", "ready": False},
    ]
    print_records(rows, OutputFormat.JSON)
    assert json.loads(capsys.readouterr().out) == rows
    print_records(rows, OutputFormat.YAML)
    assert yaml.safe_load(capsys.readouterr().out) == rows
    print_records(rows, OutputFormat.TABLE, columns=["name", "labels.role", "ready"])
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAME", "LABELS.ROLE", "READY"]
    assert table[1].split() == ["n1", "edge", "true"]
    assert table[2].split() == ["n2", "false"]


def test_a_table_row_stays_on_one_line_however_narrow_the_output(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "30")
    message = "exited with code 0; restartPolicy OnFailure"
    print_records([{"agent": "compactor", "message": message}], OutputFormat.TABLE)
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["AGENT", "MESSAGE"]
    assert row.split(maxsplit=1) == ["compactor", message]


def test_flatten_joins_nested_keys_with_dots() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": {}}) == {"a.b": 1, "a.c.d": 2, "e": {}}
