"""``chargeline payouts run|list|show|send``, ``payees configure|list`` and ``flows update``.

Registered through ``COMMAND_MODULES`` in ``main``. Payout fields (SPEC.md section 8):
``payout_id, payee_ref, currency, period_start, period_end, charge_count, amount, status``.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from typing import Any

import asyncpg
import orjson
import stripe

from workers import db
from workers.cli.args import Parser, identifier, positive_int, timestamp
from workers.cli.output import emit_object, emit_rows
from workers.errors import ChargelineError, NotFoundError, UsageError
from workers.metrics import Metrics
from workers.payouts import (
    StripePayouts,
    cut_payouts,
    rfc3339,
    stripe_is_transient,
)
from workers.retry import retry_transient
from workers.settings import Settings

PAYOUT_COLUMNS = [
    "payout_id",
    "payee_ref",
    "currency",
    "period_start",
    "period_end",
    "charge_count",
    "amount",
    "status",
]
PAYOUT_CHARGE_COLUMNS = [
    "charge_id",
    "flow_id",
    "customer_ref",
    "reference",
    "amount",
    "currency",
    "occurred_at",
    "recorded_at",
]
PAYEE_COLUMNS = ["payee_ref", "stripe_account", "stripe_payouts", "flows"]
FLOW_COLUMNS = ["flow_id", "name", "payee_ref", "status", "last_charge_at", "charge_count"]
PAYOUT_STATUSES = ("recorded", "pending", "sent", "failed")


def register(nouns: argparse._SubParsersAction[Parser]) -> None:
    """Add ``payouts`` and ``payees``, and ``update`` to the existing ``flows``."""
    payouts = nouns.add_parser("payouts", help="payouts per payee and currency").add_subparsers(
        dest="action", required=True, parser_class=Parser
    )
    run = payouts.add_parser("run", help="cut payouts now (or at a past time)")
    run.add_argument(
        "--until",
        type=_until,
        default=None,
        metavar="T",
        help="charges recorded before T (RFC 3339 or a date; default now) not yet paid out",
    )
    _format(run)
    run.set_defaults(run=payouts_run)
    listing = payouts.add_parser("list", help="payouts, newest period first")
    listing.add_argument("--payee", type=identifier)
    listing.add_argument("--currency", type=_currency)
    listing.add_argument("--status", choices=PAYOUT_STATUSES)
    listing.add_argument("--limit", type=positive_int, default=100)
    _format(listing)
    listing.set_defaults(run=payouts_list)
    show = payouts.add_parser("show", help="one payout: totals and its charges (csv: the charges)")
    show.add_argument("payout_id", metavar="ID")
    _format(show)
    show.set_defaults(run=payouts_show)
    send = payouts.add_parser("send", help="send pending payouts to Stripe now")
    _format(send)
    send.set_defaults(run=payouts_send)

    payees = nouns.add_parser("payees", help="who charges are paid out to").add_subparsers(
        dest="action", required=True, parser_class=Parser
    )
    configure = payees.add_parser("configure", help="payout settings of a payee")
    configure.add_argument("payee", type=identifier, metavar="PAYEE")
    configure.add_argument("--stripe-account", type=_stripe_account, metavar="ID")
    configure.add_argument("--stripe-payouts", choices=("on", "off"))
    _format(configure)
    configure.set_defaults(run=payees_configure)
    plist = payees.add_parser("list", help="payees with settings or named by a flow")
    _format(plist)
    plist.set_defaults(run=payees_list)

    update = _subcommands(nouns, "flows").add_parser("update", help="rename a flow, change payee")
    update.add_argument("flow_id", type=identifier, metavar="ID")
    update.add_argument("--name")
    update.add_argument("--payee", type=identifier, help="also for its charges not yet paid out")
    _format(update)
    update.set_defaults(run=flows_update)


def _subcommands(
    nouns: argparse._SubParsersAction[Parser], noun: str
) -> argparse._SubParsersAction[Parser]:
    """The subcommands of an existing noun, to add an action to it."""
    for action in nouns.choices[noun]._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise LookupError(f"{noun} has no subcommands")


def _format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format", choices=("table", "json", "csv"), default="table", help="output format"
    )


def _until(text: str) -> datetime | None:
    return None if text == "now" else timestamp(text)


def _currency(text: str) -> str:
    if len(text) != 3 or not text.isascii() or not text.isalpha():
        raise argparse.ArgumentTypeError(f"expected a currency code such as EUR, got {text!r}")
    return text.upper()


def _stripe_account(text: str) -> str:
    if not text.startswith("acct_") or not text.isascii() or not text.isprintable():
        raise argparse.ArgumentTypeError(f"expected a Stripe account id (acct_...), got {text!r}")
    return text


async def _connect(settings: Settings) -> asyncpg.Connection:
    conn: asyncpg.Connection = await asyncpg.connect(settings.dsn, timeout=10)
    return conn


async def payouts_run(settings: Settings, args: argparse.Namespace) -> int:
    conn = await _connect(settings)
    try:
        cut = await cut_payouts(
            conn,
            until=args.until,
            period=settings.payout_period,
            topic=settings.topic_payouts,
        )
    finally:
        await conn.close()
    title = f"payouts cut at {rfc3339(cut.period_end)}"
    emit_rows(cut.payouts, args.format, columns=PAYOUT_COLUMNS, title=title)
    if args.format == "table":
        charges = sum(p["charge_count"] for p in cut.payouts)
        note = "already cut there: nothing new" if cut.already_cut else f"{charges} charge(s)"
        print(f"{title}: {len(cut.payouts)} payout(s), {note}", file=sys.stderr)
    return 0


async def payouts_list(settings: Settings, args: argparse.Namespace) -> int:
    conn = await _connect(settings)
    try:
        rows = await conn.fetch(
            db.QUERIES["payout_list"], args.payee, args.currency, args.status, args.limit
        )
    finally:
        await conn.close()
    columns = [*PAYOUT_COLUMNS, "stripe_payout_id", "failure_code"]
    emit_rows([dict(r.items()) for r in rows], args.format, columns=columns, title="payouts")
    return 0


async def payouts_show(settings: Settings, args: argparse.Namespace) -> int:
    conn = await _connect(settings)
    try:
        row = await conn.fetchrow(db.QUERIES["payout_show"], args.payout_id)
        if row is None:
            raise NotFoundError(f"no payout {args.payout_id!r}")
        charges = [
            dict(r.items())
            for r in await conn.fetch(db.QUERIES["payout_charges"], row["payout_id"])
        ]
    finally:
        await conn.close()
    payout = dict(row.items())
    if args.format == "csv":
        emit_rows(charges, "csv", columns=PAYOUT_CHARGE_COLUMNS)
        return 0
    by_flow = _by_flow(charges)
    if args.format == "json":
        emit_object({**payout, "by_flow": by_flow, "charges": charges}, "json")
        return 0
    emit_object(payout, "table", title=f"payout {payout['payout_id']}")
    emit_rows(by_flow, "table", columns=["flow_id", "charge_count", "amount"], title="by flow")
    emit_rows(charges, "table", columns=PAYOUT_CHARGE_COLUMNS, title="charges")
    return 0


def _by_flow(charges: list[dict[str, Any]]) -> list[dict[str, Any]]:
    totals: dict[str, dict[str, Any]] = {}
    for charge in charges:
        total = totals.setdefault(
            charge["flow_id"], {"flow_id": charge["flow_id"], "charge_count": 0, "amount": 0}
        )
        total["charge_count"] += 1
        total["amount"] += charge["amount"]
    return [totals[flow] for flow in sorted(totals)]


async def payouts_send(settings: Settings, args: argparse.Namespace) -> int:
    metrics = Metrics()
    pool = await db.create_pool(settings.dsn, min_size=1, max_size=1)
    sender = StripePayouts(settings, metrics)
    try:
        outcomes = await retry_transient(
            lambda: sender.send_pending(pool),
            is_transient=stripe_is_transient,
            component="stripe",
            settings=settings,
            metrics=metrics,
            max_attempts=5,
        )
    except stripe.StripeError as exc:
        raise ChargelineError(f"Stripe: {exc.user_message or exc}") from None
    finally:
        await sender.close()
        await pool.close()
    emit_object(
        {outcome: outcomes[outcome] for outcome in ("sent", "failed", "skipped")},
        args.format,
        title="Stripe payouts",
    )
    return 0


async def payees_configure(settings: Settings, args: argparse.Namespace) -> int:
    stripe_payouts = None if args.stripe_payouts is None else args.stripe_payouts == "on"
    conn = await _connect(settings)
    try:
        try:
            await conn.fetchval(
                db.QUERIES["payee_configure"], args.payee, args.stripe_account, stripe_payouts
            )
        except asyncpg.CheckViolationError:
            raise UsageError(
                f"payee {args.payee!r} has no Stripe account: add --stripe-account acct_..."
            ) from None
        row = await conn.fetchrow(db.QUERIES["payee_list"], args.payee)
    finally:
        await conn.close()
    emit_object(dict(row.items()), args.format, title="payee configured")
    return 0


async def payees_list(settings: Settings, args: argparse.Namespace) -> int:
    conn = await _connect(settings)
    try:
        rows = await conn.fetch(db.QUERIES["payee_list"], None)
    finally:
        await conn.close()
    emit_rows([dict(r.items()) for r in rows], args.format, columns=PAYEE_COLUMNS, title="payees")
    return 0


async def flows_update(settings: Settings, args: argparse.Namespace) -> int:
    if args.name is None and args.payee is None:
        raise UsageError("flows update: nothing to change (give --name and/or --payee)")
    conn = await _connect(settings)
    try:
        if (
            await conn.fetchval(db.QUERIES["flow_update"], args.flow_id, args.name, args.payee)
            is None
        ):
            raise NotFoundError(f"no flow {args.flow_id!r}")
        row = dict((await conn.fetchrow(db.QUERIES["flow_list"], args.flow_id)).items())
    finally:
        await conn.close()
    if isinstance(row.get("amounts"), str):
        row["amounts"] = orjson.loads(row["amounts"])
    emit_object(row, args.format, title="flow updated")
    return 0
