"""``reconciler manager``: run the Manager (the wiring lives in reconciler.manager).

Settings come from ``--config`` < RECONCILER_* variables < ``--set``.
"""

from __future__ import annotations

import asyncio

import click

from reconciler.cli.options import set_option
from reconciler.config import ManagerSettings, load_manager_settings
from reconciler.lifecycle import restart_in_place, settings_check
from reconciler.logs import setup_logging

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
    """Run the Manager: store AgentSets and push each node its desired state.

    It serves ManagerService (for daemons) and FleetService (for this CLI) on
    grpc.listen and Prometheus metrics on metrics.listen, keeping its state in SQLite
    under state_dir or in PostgreSQL. SIGTERM or SIGINT stops it gracefully; SIGHUP
    restarts it in place (same pid) with its settings read again, once they load.
    """
    from reconciler.manager.app import run_manager

    settings = load_manager_settings(config_file, overrides=sets)
    _apply_logging(ctx, settings)
    reload = settings_check(lambda: load_manager_settings(config_file, overrides=sets))
    if asyncio.run(run_manager(settings, reload=reload)):
        restart_in_place()


def _apply_logging(ctx: click.Context, settings: ManagerSettings) -> None:
    """Log as the settings say, unless --log-format/--log-level said otherwise."""
    state = ctx.find_root().obj
    setup_logging(
        getattr(state, "log_format", None) or settings.logging.format,
        getattr(state, "log_level", None) or settings.logging.level,
    )
