"""Argument parsing with one-line errors and value types shared by every command."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any, NoReturn

from schemas.printable import is_printable
from workers.errors import UsageError
from workers.moments import range_bound


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one readable line, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def timestamp(text: str) -> datetime:
    """RFC 3339 with a time zone, a date (midnight UTC), or ``now``."""
    if text == "now":
        return datetime.now(UTC)
    try:
        return range_bound(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid time {text!r}: {exc}") from None


MAX_BIGINT = 2**63 - 1
"""The largest id or count Postgres can compare with (bigint)."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    if value > MAX_BIGINT:
        raise argparse.ArgumentTypeError(f"expected a number <= {MAX_BIGINT}, got {value}")
    return value


def dead_letter_reason(text: str) -> str:
    """One of the dead-letter reason codes: a typo would otherwise match nothing, silently."""
    from schemas.common import DEAD_LETTER_REASONS

    if text not in DEAD_LETTER_REASONS:
        raise argparse.ArgumentTypeError(
            f"unknown reason {text!r}: expected one of {', '.join(DEAD_LETTER_REASONS)}"
        )
    return text


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def identifier(text: str) -> str:
    if not 1 <= len(text) <= 200 or not is_printable(text):
        raise argparse.ArgumentTypeError(f"expected 1-200 printable characters, got {text!r}")
    return text


def add_format(parser: argparse.ArgumentParser, *, csv: bool = True) -> None:
    """``--format table|json[|csv]``: every command that prints data takes it."""
    choices = ("table", "json", "csv") if csv else ("table", "json")
    parser.add_argument("--format", choices=choices, default="table", help="output format")


def add_noun(
    nouns: argparse._SubParsersAction[Parser], noun: str, **options: Any
) -> argparse.ArgumentParser:
    """The parser of ``noun``, with its one-line help from ``workers.cli.nouns``."""
    from workers.cli.nouns import NOUNS

    return nouns.add_parser(noun, help=NOUNS[noun].help, **options)


def add_actions(
    nouns: argparse._SubParsersAction[Parser], noun: str
) -> argparse._SubParsersAction[Parser]:
    """``noun``'s parser, for a noun whose commands are actions (``flows create``...)."""
    return add_noun(nouns, noun).add_subparsers(dest="action", required=True, parser_class=Parser)
