"""Which Manager a command talks to, and with which TLS files.

``resolve_manager_address`` is the one place that decides: the ``--manager`` flag,
else ``RECONCILER_MANAGER``, else ``manager:`` in the client file
(``$XDG_CONFIG_HOME/reconciler/client.yaml``, by default
``~/.config/reconciler/client.yaml``), else ``127.0.0.1:7060``. The client file is read
with the same safe reader as the settings files. This module opens no connection; the
gRPC client does, with the ``ManagerConnection`` the commands receive.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import click

from reconciler.config import ConfigError, parse_host_port, read_settings_file

__all__ = [
    "CLIENT_FILE_KEYS",
    "DEFAULT_MANAGER_ADDRESS",
    "MANAGER_ENV",
    "ClientTls",
    "ManagerConnection",
    "ResolvedAddress",
    "client_config_path",
    "manager_options",
    "resolve_manager_address",
]

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_MANAGER_ADDRESS: Final = "127.0.0.1:7060"
MANAGER_ENV: Final = "RECONCILER_MANAGER"
#: Keys the client file may hold.
CLIENT_FILE_KEYS: Final = frozenset({"manager"})


@dataclass(frozen=True, slots=True)
class ClientTls:
    """PEM files for mutual TLS; all None means an insecure (development) channel."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True, slots=True)
class ManagerConnection:
    """The connection options as given on the command line (``manager`` unresolved)."""

    manager: str | None = None
    tls: ClientTls = ClientTls()


@dataclass(frozen=True, slots=True)
class ResolvedAddress:
    """A Manager address and where it came from (for error messages)."""

    address: str
    source: str


def client_config_path(env: Mapping[str, str]) -> Path:
    """``$XDG_CONFIG_HOME/reconciler/client.yaml``, else under ``~/.config``."""
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "~"), ".config"))
    return Path(base).expanduser() / "reconciler" / "client.yaml"


def _checked(address: str, source: str) -> ResolvedAddress:
    try:
        parse_host_port(address)
    except ValueError as exc:
        raise ConfigError(str(exc), origin=source, key="manager") from None
    return ResolvedAddress(address=address, source=source)


def _from_client_file(path: Path) -> str | None:
    if not path.exists():
        return None
    document = read_settings_file(path)
    for key in document:
        if key not in CLIENT_FILE_KEYS:
            known = ", ".join(sorted(CLIENT_FILE_KEYS))
            raise ConfigError(
                f"unknown setting (known: {known})", origin=str(path), key=str(key), file=str(path)
            )
    address = document.get("manager")
    if address is not None and not isinstance(address, str):
        raise ConfigError("expected a string", origin=str(path), key="manager", file=str(path))
    return address or None


def resolve_manager_address(
    flag: str | None,
    *,
    env: Mapping[str, str] = os.environ,
    client_file: Path | None = None,
) -> ResolvedAddress:
    """The Manager's host:port: ``flag``, else ``RECONCILER_MANAGER`` in ``env``, else
    ``manager:`` in ``client_file`` (default ``client_config_path(env)``), else
    127.0.0.1:7060. Raises ConfigError for a malformed address or client file."""
    if flag:
        return _checked(flag, "--manager")
    if env.get(MANAGER_ENV):
        return _checked(env[MANAGER_ENV], f"environment variable {MANAGER_ENV}")
    path = client_file if client_file is not None else client_config_path(env)
    from_file = _from_client_file(path)
    if from_file is not None:
        return _checked(from_file, str(path))
    return ResolvedAddress(address=DEFAULT_MANAGER_ADDRESS, source="default")


_PEM = click.Path(dir_okay=False)


def manager_options(func: F) -> F:
    """``--manager ADDR --tls-ca --tls-cert --tls-key``; the command receives
    ``connection: ManagerConnection``."""

    @functools.wraps(func)
    def wrapper(
        *args: Any,
        manager: str | None,
        tls_ca: str | None,
        tls_cert: str | None,
        tls_key: str | None,
        **kwargs: Any,
    ) -> Any:
        tls = ClientTls(ca_file=tls_ca, cert_file=tls_cert, key_file=tls_key)
        return func(*args, connection=ManagerConnection(manager=manager, tls=tls), **kwargs)

    decorators = [
        click.option(
            "--manager",
            metavar="ADDR",
            help=f"Manager host:port (default: ${MANAGER_ENV}, then client.yaml, "
            f"then {DEFAULT_MANAGER_ADDRESS}).",
        ),
        click.option("--tls-ca", type=_PEM, help="PEM file of the CA for mutual TLS."),
        click.option("--tls-cert", type=_PEM, help="PEM client certificate for mutual TLS."),
        click.option("--tls-key", type=_PEM, help="PEM private key of --tls-cert."),
    ]
    decorated: Any = wrapper
    for decorator in reversed(decorators):
        decorated = decorator(decorated)
    return decorated  # type: ignore[no-any-return]
