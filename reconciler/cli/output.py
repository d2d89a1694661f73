"""Print command results as a rich table, JSON or YAML (``-o table|json|yaml``).

Every command that prints data takes ``-o`` through ``output_option`` and prints
through ``print_records`` (a list of objects) or ``print_document`` (one object), so
scripts see the same shapes everywhere. JSON and YAML carry the data as given (for API
messages, protobuf's canonical JSON mapping); the table is for people and flattens
nested values. This module does not fetch or convert data.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import click
import yaml
from rich.console import Console
from rich.table import Table

__all__ = [
    "OutputFormat",
    "flatten",
    "output_option",
    "print_document",
    "print_records",
]

F = TypeVar("F", bound=Callable[..., Any])


class OutputFormat(enum.StrEnum):
    """How data is printed."""

    TABLE = "table"
    JSON = "json"
    YAML = "yaml"


def output_option(default: OutputFormat | None = OutputFormat.TABLE) -> Callable[[F], F]:
    """The ``-o/--output`` option; the command receives ``output: OutputFormat | None``."""
    return click.option(
        "-o",
        "--output",
        type=click.Choice([f.value for f in OutputFormat]),
        default=default.value if default else None,
        show_default=default is not None,
        callback=lambda _ctx, _param, value: OutputFormat(value) if value else None,
        help="Output format.",
    )


def flatten(document: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in document.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, default=str, ensure_ascii=False)


def _columns(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every key of every record, in first-seen order."""
    seen: dict[str, None] = {}
    for record in records:
        seen.update(dict.fromkeys(record))
    return list(seen)


def _print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column.upper(), no_wrap=True)
    for row in rows:
        table.add_row(*(_cell(row.get(column)) for column in columns))
    # One line per row, however narrow the terminal or pipe (as kubectl prints), so
    # rows stay whole for grep and awk; a terminal folds what is wider than itself.
    width = Console(width=1 << 16).measure(table).maximum
    Console(width=max(width, 1)).print(table)


def _print_data(data: Any, output: OutputFormat) -> None:
    if output is OutputFormat.JSON:
        click.echo(json.dumps(data, indent=2, default=str, ensure_ascii=False))
    else:
        click.echo(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), nl=False)


def print_records(
    records: Sequence[Mapping[str, Any]],
    output: OutputFormat,
    *,
    columns: Sequence[str] | None = None,
) -> None:
    """Print a list of objects: a table with one row each (``columns`` picks and orders
    them; default every key), or the whole list as JSON or YAML."""
    if output is not OutputFormat.TABLE:
        _print_data([dict(record) for record in records], output)
        return
    flat = [flatten(record) for record in records]
    chosen = list(columns) if columns is not None else _columns(flat)
    if not chosen:
        click.echo("No resources found.", err=True)
        return
    _print_table(flat, chosen)


def print_document(document: Mapping[str, Any], output: OutputFormat) -> None:
    """Print one object: JSON or YAML as it is, or a KEY / VALUE table of its
    flattened keys."""
    if output is not OutputFormat.TABLE:
        _print_data(dict(document), output)
        return
    rows = [{"key": key, "value": value} for key, value in flatten(document).items()]
    _print_table(rows, ["key", "value"])
