"""Rendering of command results: a human table (rich), or JSON / CSV for scripts.

``--format json`` prints exactly one JSON document on stdout: an array for lists, an
object for a ``show``.
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal
from uuid import UUID

import orjson
from rich.console import Console
from rich.table import Table

Format = Literal["table", "json", "csv"]


def _default(value: Any) -> Any:
    if isinstance(value, Decimal | UUID):
        return str(value)
    if isinstance(value, bytes | memoryview):
        return bytes(value).hex()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def to_json(document: Any) -> str:
    return orjson.dumps(
        document, default=_default, option=orjson.OPT_INDENT_2 | orjson.OPT_UTC_Z
    ).decode()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return str(value)


def emit_rows(
    rows: Sequence[Mapping[str, Any]], fmt: Format, *, columns: Sequence[str], title: str = ""
) -> None:
    """A list of objects: a table, a JSON array, or CSV with a header line."""
    if fmt == "json":
        sys.stdout.write(to_json([dict(row) for row in rows]) + "\n")
        return
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(column)) for column in columns])
        sys.stdout.write(buffer.getvalue())
        return
    table = Table(title=title or None, show_lines=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(row.get(column)) for column in columns))
    Console().print(table)
    if not rows:
        Console(stderr=True).print("(no rows)")


def emit_object(document: Mapping[str, Any], fmt: Format, *, title: str = "") -> None:
    """One object: key/value lines, or a JSON object."""
    if fmt == "json":
        sys.stdout.write(to_json(dict(document)) + "\n")
        return
    if fmt == "csv":
        emit_rows([document], fmt, columns=list(document))
        return
    table = Table(title=title or None, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in document.items():
        table.add_row(key, _cell(value))
    Console().print(table)
