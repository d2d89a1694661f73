"""``reconciler daemon``: run the node daemon (the wiring lives in reconciler.daemon).

Settings come from ``--config`` < RECONCILER_* variables < ``--set`` < the named
flags, which ``daemon_overrides`` turns into ``--set`` texts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import click

from reconciler.cli.options import set_option
from reconciler.config import DaemonSettings, load_daemon_settings
from reconciler.lifecycle import restart_in_place, settings_check
from reconciler.logs import setup_logging

__all__ = ["daemon", "daemon_overrides"]


def daemon_overrides(
    sets: Sequence[str], *, node_id: str | None, state_dir: str | None
) -> list[str]:
    """``--set`` texts followed by the named flags (which therefore win)."""
    named = {"node.id": node_id, "state_dir": state_dir}
    return [*sets, *(f"{key}={value}" for key, value in named.items() if value is not None)]


@click.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="Daemon settings file (see docs/configuration.md). Without it: defaults and "
    "RECONCILER_* variables.",
)
@set_option
@click.option("--node-id", metavar="ID", help="This node's id (sets node.id).")
@click.option("--state-dir", metavar="DIR", help="State directory (sets state_dir).")
@click.pass_context
def daemon(
    ctx: click.Context,
    config_file: str | None,
    sets: tuple[str, ...],
    node_id: str | None,
    state_dir: str | None,
) -> None:
    """Run the node daemon: keep this node's agents converged on their desired state.

    It serves DaemonService on grpc.listen, receives agent heartbeats on
    heartbeat.socket_path and heartbeat.http_listen, and, when manager.address is
    set, registers with the Manager and follows its desired state. SIGTERM or SIGINT
    stops it; agents keep running and are adopted when it starts again. SIGHUP
    restarts it in place (same pid) with its settings read again, once they load;
    agents keep running.
    """
    from reconciler.daemon.app import run_daemon

    overrides = daemon_overrides(sets, node_id=node_id, state_dir=state_dir)
    settings = load_daemon_settings(config_file, overrides=overrides)
    apply_logging(ctx, settings)
    reload = settings_check(lambda: load_daemon_settings(config_file, overrides=overrides))
    if asyncio.run(run_daemon(settings, reload=reload)):
        restart_in_place()


def apply_logging(ctx: click.Context, settings: DaemonSettings) -> None:
    """Log as the settings say, unless --log-format/--log-level said otherwise."""
    state = ctx.find_root().obj
    setup_logging(
        getattr(state, "log_format", None) or settings.logging.format,
        getattr(state, "log_level", None) or settings.logging.level,
    )
