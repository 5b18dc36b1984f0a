"""``chargeline payouts run|list|show|send|retry|cancel`` and ``payees configure|list``.

Payout fields (SPEC.md section 8):
``payout_id, payee_ref, currency, period_start, period_end, charge_count, amount, status``.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from typing import Any

import asyncpg
import stripe

from workers import db
from workers.cli.args import Parser, add_actions, add_format, identifier, positive_int, timestamp
from workers.cli.database import connect
from workers.cli.output import emit_object, emit_rows
from workers.errors import ChargelineError, NotFoundError, UsageError
from workers.jobs.payouts import (
    StripePayouts,
    cancel_payout,
    cut_payouts,
    retry_payout,
    rfc3339,
    stripe_is_transient,
)
from workers.metrics import Metrics
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
PAYOUT_STATUSES = ("recorded", "pending", "sent", "failed", "cancelled")


def add_payouts(nouns: argparse._SubParsersAction[Parser]) -> None:
    payouts = add_actions(nouns, "payouts")
    run = payouts.add_parser("run", help="cut payouts now (or at a past time)")
    run.add_argument(
        "--until",
        type=_until,
        default=None,
        metavar="T",
        help="charges recorded before T (RFC 3339 or a date; default now) not yet paid out",
    )
    add_format(run)
    run.set_defaults(run=payouts_run)
    listing = payouts.add_parser("list", help="payouts, newest period first")
    listing.add_argument("--payee", type=identifier)
    listing.add_argument("--currency", type=_currency)
    listing.add_argument("--status", choices=PAYOUT_STATUSES)
    listing.add_argument("--limit", type=positive_int, default=100)
    add_format(listing)
    listing.set_defaults(run=payouts_list)
    show = payouts.add_parser("show", help="one payout: totals and its charges (csv: the charges)")
    show.add_argument("payout_id", metavar="ID")
    add_format(show)
    show.set_defaults(run=payouts_show)
    send = payouts.add_parser("send", help="send pending payouts to Stripe now")
    add_format(send)
    send.set_defaults(run=payouts_send)
    retry = payouts.add_parser(
        "retry", help="send a failed Stripe payout again, now, and show the outcome"
    )
    retry.add_argument("payout_id", metavar="ID")
    add_format(retry)
    retry.set_defaults(run=payouts_retry)
    cancel = payouts.add_parser(
        "cancel",
        help="cancel a failed payout (or a pending one never attempted); "
        "its charges go into the next cut",
    )
    cancel.add_argument("payout_id", metavar="ID")
    add_format(cancel)
    cancel.set_defaults(run=payouts_cancel)


def add_payees(nouns: argparse._SubParsersAction[Parser]) -> None:
    payees = add_actions(nouns, "payees")
    configure = payees.add_parser("configure", help="payout settings of a payee")
    configure.add_argument("payee", type=identifier, metavar="PAYEE")
    configure.add_argument("--stripe-account", type=_stripe_account, metavar="ID")
    configure.add_argument("--stripe-payouts", choices=("on", "off"))
    add_format(configure)
    configure.set_defaults(run=payees_configure)
    plist = payees.add_parser("list", help="payees with settings or named by a flow")
    add_format(plist)
    plist.set_defaults(run=payees_list)


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


async def payouts_run(settings: Settings, args: argparse.Namespace) -> int:
    conn = await connect(settings)
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
    conn = await connect(settings)
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
    conn = await connect(settings)
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


class PayoutFailedAgain(ChargelineError):
    """Stripe refused the payout again."""


async def payouts_retry(settings: Settings, args: argparse.Namespace) -> int:
    """Sent at once, in this command, through the sender's own path (``send_one``), so the
    operator sees the outcome: the payout when sent; one line and exit 1 when Stripe refused
    it again (it is failed again) or could not be reached (it stays pending for the worker)."""
    metrics = Metrics()
    conn = await connect(settings)
    sender = StripePayouts(settings, metrics)
    try:
        payout = await retry_payout(
            conn, sender, args.payout_id, settings=settings, metrics=metrics
        )
    finally:
        await sender.close()
        await conn.close()
    if payout["status"] == "failed":
        raise PayoutFailedAgain(
            f"payout {args.payout_id!r} failed again: Stripe refused it "
            f"({payout['failure_code']}: {payout['failure_message']}); "
            "retry once the cause is fixed, or cancel it"
        )
    if payout["status"] != "sent":
        raise PayoutFailedAgain(f"payout {args.payout_id!r} is {payout['status']}, not sent")
    emit_object(payout, args.format, title=f"payout {payout['payout_id']} sent")
    return 0


async def payouts_cancel(settings: Settings, args: argparse.Namespace) -> int:
    metrics = Metrics()
    conn = await connect(settings)
    sender = StripePayouts(settings, metrics)
    try:
        payout = await cancel_payout(
            conn, sender, args.payout_id, settings=settings, metrics=metrics
        )
    finally:
        await sender.close()
        await conn.close()
    emit_object(payout, args.format, title=f"payout {payout['payout_id']} cancelled")
    if args.format == "table":
        print(
            f"{payout['charge_count']} charge(s), {payout['amount']} {payout['currency']}, "
            "released: the next cut pays them out",
            file=sys.stderr,
        )
    return 0


async def payees_configure(settings: Settings, args: argparse.Namespace) -> int:
    stripe_payouts = None if args.stripe_payouts is None else args.stripe_payouts == "on"
    conn = await connect(settings)
    try:
        try:
            await conn.fetchval(
                db.QUERIES["payee_configure"], args.payee, args.stripe_account, stripe_payouts
            )
        except asyncpg.CheckViolationError:
            raise UsageError(
                f"payee {args.payee!r} has no Stripe account: add --stripe-account acct_..."
            ) from None
        row = await db.fetch_one(conn, db.QUERIES["payee_list"], args.payee)
    finally:
        await conn.close()
    emit_object(dict(row.items()), args.format, title="payee configured")
    return 0


async def payees_list(settings: Settings, args: argparse.Namespace) -> int:
    conn = await connect(settings)
    try:
        rows = await conn.fetch(db.QUERIES["payee_list"], None)
    finally:
        await conn.close()
    emit_rows([dict(r.items()) for r in rows], args.format, columns=PAYEE_COLUMNS, title="payees")
    return 0
