"""The ``reconciler`` group: global options, the command list, and error mapping.

``cli`` is the click group; ``main`` is the console-script entry point. Expected
failures (``ConfigError``, ``CliError``, usage errors) end as one line on stderr with
a non-zero status, never a traceback; an unexpected exception is reported in one line
too, with its traceback logged at debug level. Each command lives in its own module
(``*_cmd.py``) and is only registered here.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import click

from reconciler.cli.agent_cmd import agent
from reconciler.cli.apply_cmd import apply
from reconciler.cli.certs_cmd import certs
from reconciler.cli.config_cmd import config
from reconciler.cli.daemon_cmd import daemon
from reconciler.cli.delete_cmd import delete
from reconciler.cli.describe_cmd import describe
from reconciler.cli.dev_cmd import dev
from reconciler.cli.events_cmd import events
from reconciler.cli.get_cmd import get
from reconciler.cli.manager_cmd import manager
from reconciler.cli.metrics_cmd import metrics
from reconciler.cli.options import EXIT_FAILURE, CliError
from reconciler.cli.version_cmd import version
from reconciler.config import ConfigError
from reconciler.logs import LogFormat, LogLevel, setup_logging
from reconciler.model.errors import ReconcilerError

__all__ = ["COMMANDS", "CliState", "ReconcilerGroup", "cli", "main"]

_log = logging.getLogger(__name__)

#: Every top-level command, in the order ``--help`` lists them.
COMMANDS: Final = (
    dev,
    daemon,
    manager,
    apply,
    get,
    describe,
    delete,
    agent,
    metrics,
    events,
    config,
    certs,
    version,
)


@dataclass(frozen=True, slots=True)
class CliState:
    """The global options, in ``ctx.obj`` for commands that start long-running
    processes: None means "not given" (settings files then decide)."""

    log_format: LogFormat | None = None
    log_level: LogLevel | None = None


class ReconcilerGroup(click.Group):
    """A group that turns ``ConfigError`` from any command into a one-line CliError."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            raise CliError(str(exc)) from exc


@click.group(cls=ReconcilerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-format",
    type=click.Choice([f.value for f in LogFormat]),
    help="Log format (default: the settings file's, else text).",
)
@click.option(
    "--log-level",
    type=click.Choice([level.value for level in LogLevel]),
    help="Least severe level logged (default: the settings file's, else warning).",
)
@click.pass_context
def cli(ctx: click.Context, log_format: str | None, log_level: str | None) -> None:
    """reconciler: keep agent processes alive and correct across a fleet of hosts."""
    state = CliState(
        log_format=LogFormat(log_format) if log_format else None,
        log_level=LogLevel(log_level) if log_level else None,
    )
    ctx.obj = state
    setup_logging(state.log_format or LogFormat.TEXT, state.log_level or LogLevel.WARNING)


for _command in COMMANDS:
    cli.add_command(_command)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    args = list(argv) if argv is not None else sys.argv[1:]
    try:
        result = cli.main(args=args, prog_name="reconciler", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        click.echo("aborted", err=True)
        return 130
    except BrokenPipeError:
        return EXIT_FAILURE
    except (ReconcilerError, OSError) as exc:
        # A refusal at start (an unsafe state directory, a port in use, ...): the
        # message says what and where; no traceback.
        click.echo(f"reconciler: {exc}", err=True)
        return EXIT_FAILURE
    except Exception as exc:
        _log.debug("unexpected error", exc_info=True)
        click.echo(f"reconciler: unexpected error: {type(exc).__name__}: {exc}", err=True)
        return EXIT_FAILURE
    return result if isinstance(result, int) else 0
