"""``reconciler dev``: a Manager and a daemon for this host in one process, for trying
things out. Insecure, loopback only, any command allowed; says so at start."""

from __future__ import annotations

import click

from reconciler.cli.options import not_implemented

__all__ = ["dev"]


@click.command()
@click.option(
    "-f",
    "--file",
    "files",
    type=click.Path(exists=True, dir_okay=False),
    multiple=True,
    help="AgentSet file to apply at start. Repeatable.",
)
@click.option(
    "--state-dir",
    default=".reconciler",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the Manager and the daemon keep their state.",
)
@click.option("--otlp-endpoint", metavar="URL", help="Export traces by OTLP to this URL.")
@click.pass_context
def dev(
    ctx: click.Context, files: tuple[str, ...], state_dir: str, otlp_endpoint: str | None
) -> None:
    """Run a development Manager and daemon for this host (Ctrl-C stops both)."""
    not_implemented(ctx)
