"""``reconciler config check FILE``: validate a settings file and print the result.

The file's role (daemon or manager) comes from ``--role`` or, when absent, from its
top-level keys (``infer_role``: store, nodes, push or retention make it a Manager
file). The printed settings are the effective ones: defaults < file < RECONCILER_*
variables < ``--set``, secrets redacted. Errors arrive as ``ConfigError`` and leave as
one line on stderr with exit status 1 (see ``main.py``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import click

from reconciler.cli.options import set_option
from reconciler.cli.output import OutputFormat, output_option, print_document
from reconciler.config import (
    DaemonSettings,
    ManagerSettings,
    Role,
    infer_role,
    load_daemon_settings,
    load_manager_settings,
    settings_to_dict,
)

__all__ = ["check", "config", "load_role_settings"]


def load_role_settings(
    role: Role,
    path: str | None,
    *,
    env: Mapping[str, str] = os.environ,
    overrides: Sequence[str] = (),
) -> DaemonSettings | ManagerSettings:
    """The settings of ``role`` from ``path``, ``env`` and ``overrides``."""
    if role is Role.MANAGER:
        return load_manager_settings(path, env=env, overrides=overrides)
    return load_daemon_settings(path, env=env, overrides=overrides)


@click.group()
def config() -> None:
    """Work with daemon and Manager settings files."""


@config.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--role",
    type=click.Choice([r.value for r in Role]),
    help="Which settings the file holds. Default: manager when it has a top-level "
    "store, nodes, push or retention key, else daemon.",
)
@set_option
@output_option(default=OutputFormat.YAML)
def check(file: str, role: str | None, sets: tuple[str, ...], output: OutputFormat) -> None:
    """Validate FILE and print the effective settings (secrets redacted).

    Exit status 0 when valid; 1 with the problem (file, key) on stderr otherwise.
    """
    chosen = Role(role) if role else infer_role(file)
    settings = load_role_settings(chosen, file, overrides=sets)
    print_document(settings_to_dict(settings), output)
    click.echo(f"{file}: valid {chosen.value} settings", err=True)
