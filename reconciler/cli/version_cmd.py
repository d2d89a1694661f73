"""``reconciler version``: the installed version (plain, or with ``-o``)."""

from __future__ import annotations

import platform

import click

from reconciler import __version__
from reconciler.cli.output import OutputFormat, output_option, print_document

__all__ = ["version", "version_info"]


def version_info() -> dict[str, str]:
    """What ``version -o json`` prints."""
    return {"version": __version__, "python": platform.python_version()}


@click.command()
@output_option(default=None)
def version(output: OutputFormat | None) -> None:
    """Print the reconciler version."""
    if output is None:
        click.echo(f"reconciler {__version__}")
    else:
        print_document(version_info(), output)
