"""``reconciler manager``: run the Manager (the wiring lives in reconciler.manager).

Settings come from ``--config`` < RECONCILER_* variables < ``--set``.
"""

from __future__ import annotations

import click

from reconciler.cli.options import not_implemented, set_option

__all__ = ["manager"]


@click.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="Manager settings file (see docs/configuration.md). Without it: defaults and "
    "RECONCILER_* variables.",
)
@set_option
@click.pass_context
def manager(ctx: click.Context, config_file: str | None, sets: tuple[str, ...]) -> None:
    """Run the Manager: store AgentSets and push each node its desired state."""
    not_implemented(ctx)
