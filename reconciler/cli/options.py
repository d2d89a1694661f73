"""Option types, decorators and errors shared by the ``reconciler`` commands.

``CliError`` is the one way a command fails on purpose: its message is printed alone
on stderr and the process exits with its code (``main.py`` turns ``ConfigError`` into
one too). Option types parse durations (``120s``, ``10m``) and ``key=value`` pairs.
Manager connection options live in ``connection.py``.
"""

from __future__ import annotations

import functools
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Final, TypeVar

import click

from reconciler.config import MAX_DURATION_S

__all__ = [
    "DURATION",
    "EXIT_FAILURE",
    "KEY_VALUE",
    "CliError",
    "DurationParam",
    "KeyValueParam",
    "Target",
    "parse_duration",
    "set_option",
    "target_options",
]

F = TypeVar("F", bound=Callable[..., Any])

#: Exit status of a command that failed (bad settings, unreachable server, ...).
EXIT_FAILURE: Final = 1
#: Exit status of a command whose machinery is not built yet (click uses 2 for usage).

_DURATION: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?")
_UNIT_S: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class CliError(click.ClickException):
    """An expected failure: ``message`` is printed alone on stderr, exit status 1."""

    exit_code = EXIT_FAILURE

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(self.format_message(), err=file is None, file=file)


def parse_duration(text: str) -> float:
    """``500ms``, ``120s``, ``10m``, ``1h``, ``1d`` or bare seconds, as float seconds in
    (0, one year]. Raises ValueError."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration (examples: 500ms, 30s, 10m, 1h)")
    seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    if not 0 < seconds <= MAX_DURATION_S:
        raise ValueError(f"{text!r} must be more than 0 and at most one year")
    return seconds


class DurationParam(click.ParamType[float, Any]):
    """A duration option such as ``--timeout 120s``; the value is float seconds."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class KeyValueParam(click.ParamType[tuple[str, str], Any]):
    """A ``key=value`` option (e.g. ``-l role=edge``); the value is a (key, value) pair."""

    name = "key=value"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, str]:
        if isinstance(value, tuple):
            return typing.cast(tuple[str, str], value)
        key, equals, item = str(value).partition("=")
        if not equals or not key:
            self.fail(f"expected key=value, got {value!r}", param, ctx)
        return key, item


DURATION: Final = DurationParam()
KEY_VALUE: Final = KeyValueParam()


def set_option(func: F) -> F:
    """``--set section.field=value`` (repeatable); the command receives ``sets``."""
    return click.option(
        "--set",
        "sets",
        multiple=True,
        metavar="SECTION.FIELD=VALUE",
        help="Override one setting (after the file and RECONCILER_* variables). Repeatable.",
    )(func)


@dataclass(frozen=True, slots=True)
class Target:
    """Where an agent command goes: through the Manager to ``node``, or straight to the
    daemon at ``daemon`` (host:port). Both None: the Manager finds the agent's node."""

    node: str | None = None
    daemon: str | None = None


def target_options(func: F) -> F:
    """``--node NODE | --daemon ADDR``; the command receives ``target: Target``."""

    @functools.wraps(func)
    def wrapper(*args: Any, node: str | None, daemon: str | None, **kwargs: Any) -> Any:
        if node is not None and daemon is not None:
            raise click.UsageError("--node and --daemon cannot be used together")
        return func(*args, target=Target(node=node, daemon=daemon), **kwargs)

    with_daemon = click.option(
        "--daemon",
        metavar="ADDR",
        help="Talk to this daemon (host:port) directly instead of through the Manager.",
    )(wrapper)
    return click.option("--node", metavar="NODE", help="The node the agent runs on.")(with_daemon)  # type: ignore[return-value]
