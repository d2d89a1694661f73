"""CommandPolicy: argv[0] resolution through PATH and the local allow-list."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from reconciler.daemon.commands import CommandPolicy
from reconciler.model.errors import InvalidArgument

FIELD = "agents[3].command"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """tmp/bin/agent (executable), tmp/bin/notes (not executable), tmp/bin/link ->
    tmp/other/tool (executable), tmp/other/tool, tmp/bin/subdir/."""
    (tmp_path / "bin" / "subdir").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    _executable(tmp_path / "bin" / "agent")
    _executable(tmp_path / "other" / "tool")
    (tmp_path / "bin" / "notes").write_text("not a program\n")
    (tmp_path / "bin" / "link").symlink_to(tmp_path / "other" / "tool")
    return tmp_path


def _executable(path: Path) -> None:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _policy(tree: Path, *patterns: str, allow_any: bool = False) -> CommandPolicy:
    resolved = [pattern.replace("{tree}", str(tree)) for pattern in patterns]
    return CommandPolicy(resolved, allow_any, search_path=f"{tree}/bin")


@pytest.mark.parametrize(
    ("patterns", "command", "expected"),
    [
        pytest.param(["{tree}/bin/*"], ["agent"], ["{tree}/bin/agent"], id="bare-name-via-path"),
        pytest.param(
            ["{tree}/bin/agent"],
            ["{tree}/bin/agent", "--fast"],
            ["{tree}/bin/agent", "--fast"],
            id="absolute-exact-pattern",
        ),
        pytest.param(
            ["{tree}/bin/*"],
            ["{tree}/bin/./subdir/../agent"],
            ["{tree}/bin/agent"],
            id="dots-normalised",
        ),
        pytest.param(
            ["{tree}/bin/*", "{tree}/other/*"],
            ["{tree}/bin/link"],
            ["{tree}/bin/link"],
            id="symlink-target-also-allowed",
        ),
        pytest.param(
            ["{tree}/bin/*"],
            ["agent", "; touch /tmp/canary", "$(reboot)", "`id`", "a|b", "x > y"],
            ["{tree}/bin/agent", "; touch /tmp/canary", "$(reboot)", "`id`", "a|b", "x > y"],
            id="shell-metacharacters-passed-verbatim",
        ),
    ],
)
def test_allowed_commands_resolve_to_absolute_argv(
    tree: Path, patterns: list[str], command: list[str], expected: list[str]
) -> None:
    policy = _policy(tree, *patterns)
    commands = [arg.replace("{tree}", str(tree)) for arg in command]
    want = tuple(arg.replace("{tree}", str(tree)) for arg in expected)
    assert policy.resolve(commands, field=FIELD) == want


@pytest.mark.parametrize(
    ("patterns", "command", "reason"),
    [
        pytest.param([], ["agent"], "agents.allowed_commands is empty", id="empty-allow-list"),
        pytest.param(["{tree}/bin/*"], ["bin/agent"], "relative path", id="relative-with-slash"),
        pytest.param(["{tree}/bin/*"], ["./agent"], "relative path", id="dot-slash"),
        pytest.param(["{tree}/bin/*"], ["missing"], "not found on the daemon's PATH", id="no-such"),
        pytest.param(["{tree}/bin/*"], ["{tree}/bin/gone"], "does not exist", id="missing-file"),
        pytest.param(["{tree}/bin/*"], ["{tree}/bin/notes"], "not executable", id="not-executable"),
        pytest.param(["{tree}/bin/*"], ["{tree}/bin/subdir"], "not a regular file", id="directory"),
        pytest.param(["{tree}/bin/*"], ["{tree}/other/tool"], "matches no pattern", id="outside"),
        pytest.param(
            ["{tree}/bin/*"],
            ["{tree}/bin/../other/tool"],
            "matches no pattern",
            id="dot-dot-escape",
        ),
        pytest.param(
            ["{tree}/bin/*"], ["{tree}/bin/link"], "through symbolic links", id="symlink-escape"
        ),
        pytest.param(["{tree}/bin/*"], [""], "non-empty string", id="empty-program"),
        pytest.param(["{tree}/bin/*"], ["age\x00nt"], "NUL byte", id="nul-byte"),
    ],
)
def test_refused_commands_name_the_program_field(
    tree: Path, patterns: list[str], command: list[str], reason: str
) -> None:
    policy = _policy(tree, *patterns)
    commands = [arg.replace("{tree}", str(tree)) for arg in command]
    with pytest.raises(InvalidArgument) as caught:
        policy.resolve(commands, field=FIELD)
    assert caught.value.field == f"{FIELD}[0]"
    assert reason in caught.value.reason


def test_check_allowed_is_the_allow_list_half_of_resolve(tree: Path) -> None:
    policy = _policy(tree, "{tree}/bin/*")
    policy.check_allowed(f"{tree}/bin/agent", field="a.command[0]")
    policy.check_allowed(f"{tree}/bin/missing", field="a.command[0]")  # a start fails instead
    for refused, reason in [
        (f"{tree}/other/tool", "matches no pattern"),
        (f"{tree}/bin/link", "through symbolic links"),
    ]:
        with pytest.raises(InvalidArgument) as caught:
            policy.check_allowed(refused, field="a.command[0]")
        assert caught.value.field == "a.command[0]"
        assert reason in caught.value.reason


def test_an_empty_command_names_the_command_field(tree: Path) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _policy(tree, "{tree}/bin/*").resolve([], field=FIELD)
    assert caught.value.field == FIELD


@pytest.mark.parametrize(
    ("command", "allowed"),
    [
        pytest.param(["{tree}/other/tool"], True, id="any-existing-executable"),
        pytest.param(["{tree}/bin/link"], True, id="symlinks-too"),
        pytest.param(["{tree}/bin/notes"], False, id="still-must-be-executable"),
        pytest.param(["{tree}/bin/gone"], False, id="still-must-exist"),
        pytest.param(["other/tool"], False, id="still-no-relative-paths"),
    ],
)
def test_allow_any_skips_only_the_pattern_check(
    tree: Path, command: list[str], allowed: bool
) -> None:
    policy = _policy(tree, allow_any=True)
    commands = [arg.replace("{tree}", str(tree)) for arg in command]
    if allowed:
        assert policy.resolve(commands, field=FIELD)[0] == commands[0]
    else:
        with pytest.raises(InvalidArgument):
            policy.resolve(commands, field=FIELD)


def test_relative_path_entries_are_ignored_when_resolving_bare_names(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tree / "bin")
    policy = CommandPolicy(["/*"], search_path=f".{os.pathsep}{os.pathsep}bin")
    with pytest.raises(InvalidArgument, match="not found"):
        policy.resolve(["agent"], field=FIELD)


def test_the_real_path_lookup_finds_system_programs_on_the_daemons_path() -> None:
    policy = CommandPolicy(["/*"], search_path="/usr/bin:/bin")
    program = policy.resolve(["sleep", "1"], field=FIELD)
    assert program[0].startswith("/")
    assert program[0].endswith("/sleep")
    assert program[1:] == ("1",)


@pytest.mark.parametrize(
    "pattern",
    [
        pytest.param("usr/bin/*", id="relative"),
        pytest.param("*", id="bare-star"),
        pytest.param("", id="empty"),
    ],
)
def test_patterns_must_be_absolute(pattern: str) -> None:
    with pytest.raises(ValueError, match="allowed_commands"):
        CommandPolicy([pattern])


@pytest.mark.parametrize(
    ("patterns", "allow_any", "phrase"),
    [
        pytest.param([], False, "no agent command may run", id="empty"),
        pytest.param([], True, "development mode", id="allow-any"),
        pytest.param(["/opt/agents/*"], False, "/opt/agents/*", id="patterns"),
    ],
)
def test_describe_says_what_the_policy_allows(
    patterns: list[str], allow_any: bool, phrase: str
) -> None:
    assert phrase in CommandPolicy(patterns, allow_any).describe()
