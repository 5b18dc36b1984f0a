"""``chargeline charges list|show``: recorded charges, with the fields of the contract."""

from __future__ import annotations

import argparse
from typing import Any

import orjson

from workers.cli.args import (
    MAX_BIGINT,
    Parser,
    add_actions,
    add_format,
    identifier,
    positive_int,
    timestamp,
)
from workers.cli.database import fetch_rows
from workers.cli.output import emit_object, emit_rows
from workers.errors import NotFoundError, UsageError
from workers.settings import Settings

CHARGE_COLUMNS = [
    "flow_id",
    "customer_ref",
    "reference",
    "amount",
    "currency",
    "status",
    "metadata",
    "occurred_at",
    "recorded_at",
]


def add_charges(nouns: argparse._SubParsersAction[Parser]) -> None:
    charges = add_actions(nouns, "charges")
    clist = charges.add_parser("list", help="charges, newest first")
    clist.add_argument("--flow", type=identifier)
    clist.add_argument("--customer", type=identifier)
    clist.add_argument("--status", choices=("recorded", "paid_out"))
    clist.add_argument("--since", type=timestamp, help="recorded at or after (RFC 3339 or date)")
    clist.add_argument("--until", type=timestamp, help="recorded before (RFC 3339 or date)")
    clist.add_argument("--limit", type=positive_int, default=100)
    add_format(clist)
    clist.set_defaults(run=charges_list)
    cshow = charges.add_parser("show", help="one charge, by id or reference")
    cshow.add_argument("charge", metavar="ID|REFERENCE")
    cshow.add_argument("--flow", type=identifier, help="the flow, when showing by reference")
    add_format(cshow)
    cshow.set_defaults(run=charges_show)


def _charge_row(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    if row.get("metadata") is not None:
        row["metadata"] = orjson.loads(row["metadata"])
    return row


async def charges_list(settings: Settings, args: argparse.Namespace) -> int:
    if args.since and args.until and args.since > args.until:  # equal: an empty range
        raise UsageError("--since must not be after --until")
    rows = await fetch_rows(
        settings,
        "charge_list",
        args.flow,
        args.customer,
        args.status,
        args.since,
        args.until,
        args.limit,
    )
    emit_rows([_charge_row(r) for r in rows], args.format, columns=CHARGE_COLUMNS, title="charges")
    return 0


async def charges_show(settings: Settings, args: argparse.Namespace) -> int:
    digits = args.charge.isascii() and args.charge.isdigit() and int(args.charge) <= MAX_BIGINT
    charge_id = int(args.charge) if digits and args.flow is None else None
    rows = await fetch_rows(settings, "charge_show", charge_id, args.flow, args.charge)
    if charge_id is not None and not rows:
        rows = await fetch_rows(settings, "charge_show", None, None, args.charge)
    if not rows:
        raise NotFoundError(f"no charge {args.charge!r}")
    if len(rows) > 1:
        raise UsageError(f"reference {args.charge!r} is used in several flows: add --flow")
    emit_object(_charge_row(rows[0]), args.format, title="charge")
    return 0
