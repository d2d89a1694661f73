"""``reconciler certs init DIR``: a CA plus Manager, node and client certificates for
mutual TLS in development and small fleets (PEM files, keys 0600).

The certificates themselves are made by ``reconciler.pki.make_dev_pki``; this module
parses the options, turns its refusals into one-line errors, and prints what was
written with the settings that use it. Production fleets bring their own CA
(``docs/security.md``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from reconciler.cli.options import CliError

if TYPE_CHECKING:
    from reconciler.pki import DevPki

__all__ = ["certs", "init", "usage_text"]


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
    "manager_hosts",
    multiple=True,
    metavar="HOST",
    help="Host name or address the Manager certificate is valid for (repeatable); "
    "localhost, 127.0.0.1 and ::1 are always included.",
)
@click.option("--force", is_flag=True, help="Overwrite certificates and keys already in DIR.")
def init(directory: str, nodes: int, manager_hosts: tuple[str, ...], force: bool) -> None:
    """Create a CA and certificates in DIR."""
    try:
        # Loaded here: the certificate toolkit is 8 MiB that no other command needs.
        from reconciler.pki import make_dev_pki

        pki = make_dev_pki(directory, nodes=nodes, manager_hosts=manager_hosts, force=force)
    except FileExistsError as exc:
        raise CliError(f"certs init: {exc}") from None
    except ValueError as exc:
        raise CliError(f"certs init: {exc}") from None
    except OSError as exc:
        where = exc.filename or directory
        raise CliError(f"certs init: cannot write {where}: {exc.strerror}") from None
    click.echo(usage_text(pki), nl=False)


def _tls_section(ca: str, cert: str, key: str) -> str:
    return f"tls:\n  mode: mtls\n  ca_file: {ca}\n  cert_file: {cert}\n  key_file: {key}\n"


def usage_text(pki: DevPki) -> str:
    """The files written and the settings that use them."""
    lines = [f"wrote {path}" for path in pki.files()]
    ca = pki.ca_cert.resolve()
    manager = _tls_section(str(ca), str(pki.manager_cert.resolve()), str(pki.manager_key.resolve()))
    node_id, (node_cert, node_key) = next(iter(pki.node_certs.items()))
    node = _tls_section(str(ca), str(node_cert.resolve()), str(node_key.resolve()))
    text = "\n".join(lines) + "\n\n"
    text += f"# manager.yaml\n{manager}\n# daemon.yaml on {node_id} (node.id: {node_id})\n{node}\n"
    if pki.operator is not None:
        cert, key = (p.resolve() for p in pki.operator)
        flags = f"--tls-ca {ca} --tls-cert {cert} --tls-key {key}"
        text += (
            f"# the CLI (any command that talks to the Manager)\nreconciler get nodes {flags}\n\n"
        )
    text += f"Keep {pki.ca_key} private: whoever holds it can make certificates for any node.\n"
    return text
