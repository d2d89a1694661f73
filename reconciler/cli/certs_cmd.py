"""``reconciler certs init DIR``: a CA plus Manager, node and client certificates for
mutual TLS in development and small fleets (PEM files, keys 0600)."""

from __future__ import annotations

import click

from reconciler.cli.options import not_implemented

__all__ = ["certs", "init"]


@click.group()
def certs() -> None:
    """Make TLS certificates."""


@certs.command()
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False))
@click.option(
    "--nodes",
    type=click.IntRange(min=1, max=10000),
    default=1,
    show_default=True,
    help="Node certificates to make (node-1 ... node-N).",
)
@click.option(
    "--manager-host",
    default="127.0.0.1",
    show_default=True,
    metavar="HOST",
    help="Host name or address the Manager certificate is valid for.",
)
@click.pass_context
def init(ctx: click.Context, directory: str, nodes: int, manager_host: str) -> None:
    """Create a CA and certificates in DIR."""
    not_implemented(ctx)
