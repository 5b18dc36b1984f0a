"""``chargeline balances show/list`` and ``chargeline usage``: reading the token ledger.

What they show is what the usage and expiry workers last wrote (the ``customers`` row is
kept equal to the sum of the customer's ledger entries); nothing here writes.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

import asyncpg

from workers import db
from workers.cli.args import (
    Parser,
    add_actions,
    add_format,
    add_noun,
    identifier,
    positive_int,
    timestamp,
)
from workers.cli.database import connect
from workers.cli.output import emit_object, emit_rows
from workers.errors import NotFoundError, UsageError
from workers.settings import Settings

RECENT_ALERTS = 10

# The table view keeps what fits a terminal; JSON and CSV carry every field.
GRANT_COLUMNS = ["reference", "tokens", "remaining", "expires_at", "source", "status"]
ALERT_COLUMNS = ["type", "balance", "cause", "at"]
BALANCE_LIST_COLUMNS = [
    "customer_ref",
    "balance",
    "overage",
    "low_balance_threshold",
    "depleted",
    "grants_with_tokens",
    "last_activity_at",
]
BALANCE_TABLE_COLUMNS = [
    "customer_ref",
    "balance",
    "overage",
    "grants_with_tokens",
    "last_activity_at",
]
USAGE_COLUMNS = ["customer_ref", "period_start", "feature", "events", "tokens"]


def add_balances(nouns: argparse._SubParsersAction[Parser]) -> None:
    balances = add_actions(nouns, "balances")
    show = balances.add_parser("show", help="one customer's balance, grants and recent alerts")
    show.add_argument("customer", type=identifier, metavar="CUSTOMER")
    add_format(show)
    show.set_defaults(run=balances_show)
    listing = balances.add_parser("list", help="customers with balances, lowest first")
    listing.add_argument("--depleted", action="store_true", help="only balances <= 0")
    listing.add_argument("--limit", type=positive_int, default=100)
    add_format(listing)
    listing.set_defaults(run=balances_list)


def add_usage(nouns: argparse._SubParsersAction[Parser]) -> None:
    usage = add_noun(nouns, "usage")
    usage.add_argument("customer", type=identifier, metavar="CUSTOMER")
    usage.add_argument(
        "--since", type=timestamp, help="occurred at or after (default: start of this month, UTC)"
    )
    usage.add_argument("--until", type=timestamp, help="occurred before (default: now)")
    usage.add_argument("--granularity", choices=("day", "month"), default="day")
    usage.add_argument("--feature", help="only this feature")
    add_format(usage)
    usage.set_defaults(run=usage_report)


def _rows(records: list[asyncpg.Record]) -> list[dict[str, Any]]:
    return [db.record_to_dict(record) for record in records]


async def balances_show(settings: Settings, args: argparse.Namespace) -> int:
    """One customer: balance, overage, alert state, every grant, the last alerts."""
    conn = await connect(settings)
    try:
        # One snapshot, so that balance = sum(remaining) - overage holds in what is shown
        # even while a worker is applying a batch for this customer.
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            customer = await conn.fetchrow(db.QUERIES["balance_customer"], args.customer)
            if customer is None:
                raise NotFoundError(f"no customer {args.customer!r}")
            grants = _rows(await conn.fetch(db.QUERIES["balance_grants"], args.customer))
            alerts = _rows(
                await conn.fetch(db.QUERIES["balance_recent_alerts"], args.customer, RECENT_ALERTS)
            )
    finally:
        await conn.close()
    summary = db.record_to_dict(customer)
    if args.format != "table":
        emit_object({**summary, "grants": grants, "recent_alerts": alerts}, args.format)
        return 0
    for alert in alerts:
        alert["cause"] = f"{alert['cause_type']} {alert['cause_reference'] or ''}".strip()
    emit_object(_to_seconds(summary), args.format, title=f"balance of {args.customer}")
    emit_rows(list(map(_to_seconds, grants)), "table", columns=GRANT_COLUMNS, title="grants")
    emit_rows(list(map(_to_seconds, alerts)), "table", columns=ALERT_COLUMNS, title="recent alerts")
    return 0


async def balances_list(settings: Settings, args: argparse.Namespace) -> int:
    """Customers, lowest balance first; ``--depleted``: only those at or below zero."""
    conn = await connect(settings)
    try:
        rows = _rows(await conn.fetch(db.QUERIES["balance_list"], args.depleted, args.limit))
    finally:
        await conn.close()
    title = "depleted balances" if args.depleted else "balances"
    if args.format == "table":
        rows = list(map(_to_seconds, rows))
        emit_rows(rows, "table", columns=BALANCE_TABLE_COLUMNS, title=title)
    else:
        emit_rows(rows, args.format, columns=BALANCE_LIST_COLUMNS)
    return 0


async def usage_report(settings: Settings, args: argparse.Namespace) -> int:
    """Events and tokens per UTC day or month and feature, by when the usage occurred."""
    now = datetime.now(UTC)
    since: datetime = args.since or now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    until: datetime = args.until or now
    if since > until:  # equal: an empty range
        raise UsageError(f"--since ({_time(since)}) must not be after --until ({_time(until)})")
    conn = await connect(settings)
    try:
        if not await conn.fetchval(db.QUERIES["customer_exists"], args.customer):
            raise NotFoundError(f"no customer {args.customer!r}")
        rows = _rows(
            await conn.fetch(
                db.QUERIES["usage_report"],
                args.customer,
                since,
                until,
                args.granularity,
                args.feature,
            )
        )
    finally:
        await conn.close()
    title = f"usage of {args.customer} by {args.granularity}, {_time(since)} to {_time(until)}"
    emit_rows(rows, args.format, columns=USAGE_COLUMNS, title=title)
    return 0


def _to_seconds(row: dict[str, Any]) -> dict[str, Any]:
    """For the table view: times to the second, so that a row fits a terminal."""
    return {
        key: value.replace(microsecond=0) if isinstance(value, datetime) else value
        for key, value in row.items()
    }


def _time(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
