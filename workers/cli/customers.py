"""``chargeline customers configure|payment-setup`` and ``chargeline credits topup``."""

from __future__ import annotations

import argparse
import uuid

from schemas.common import MAX_QUANTITY
from schemas.currency import ACTIVE_CURRENCIES
from workers import db
from workers.cli.args import Parser, add_actions, add_format, identifier
from workers.cli.output import emit_object
from workers.errors import ChargelineError, UsageError
from workers.jobs.reloads import ReloadProcessor
from workers.metrics import Metrics
from workers.settings import Settings


def currency(text: str) -> str:
    code = text.upper()
    if code not in ACTIVE_CURRENCIES:
        raise argparse.ArgumentTypeError(f"{text!r} is not an active ISO 4217 currency")
    return code


def _whole(text: str, least: int) -> int:
    """A whole number from ``least`` to MAX_QUANTITY (the bound of tokens and amounts in
    events): a reload's tokens and price must fit the grant it becomes, checked before any
    card is charged."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not least <= value <= MAX_QUANTITY:
        raise argparse.ArgumentTypeError(
            f"expected a number from {least} to {MAX_QUANTITY:_}, got {value}".replace("_", ",")
        )
    return value


def non_negative_int(text: str) -> int:
    return _whole(text, 0)


def quantity(text: str) -> int:
    return _whole(text, 1)


def on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text == "on"


def add_customers(nouns: argparse._SubParsersAction[Parser]) -> None:
    customers = add_actions(nouns, "customers")
    configure = customers.add_parser("configure", help="Stripe customer, auto-reload, low balance")
    configure.add_argument("customer", type=identifier, metavar="CUSTOMER")
    configure.add_argument("--stripe-customer", metavar="ID", help="Stripe customer id (cus_...)")
    configure.add_argument("--auto-reload", type=on_off, metavar="on|off")
    configure.add_argument("--reload-threshold", type=non_negative_int, metavar="TOKENS")
    configure.add_argument("--reload-tokens", type=quantity, metavar="TOKENS")
    configure.add_argument("--reload-price", type=quantity, metavar="MINOR_UNITS")
    configure.add_argument("--currency", type=currency, metavar="CODE")
    configure.add_argument("--low-balance-threshold", type=non_negative_int, metavar="TOKENS")
    add_format(configure, csv=False)
    configure.set_defaults(run=configure_customer)
    setup = customers.add_parser(
        "payment-setup", help="start collecting a card: a Stripe SetupIntent for the browser"
    )
    setup.add_argument("customer", type=identifier, metavar="CUSTOMER")
    add_format(setup, csv=False)
    setup.set_defaults(run=payment_setup_command)


def add_credits(nouns: argparse._SubParsersAction[Parser]) -> None:
    credits = add_actions(nouns, "credits")
    topup = credits.add_parser("topup", help="charge the customer through Stripe, grant tokens")
    topup.add_argument("customer", type=identifier, metavar="CUSTOMER")
    topup.add_argument("--tokens", type=quantity, required=True)
    topup.add_argument("--price", type=quantity, required=True, metavar="MINOR_UNITS")
    topup.add_argument("--currency", type=currency, required=True, metavar="CODE")
    add_format(topup, csv=False)
    topup.set_defaults(run=credits_topup)


async def configure_customer(settings: Settings, args: argparse.Namespace) -> int:

    conn = await db.connect(settings.dsn)
    try:
        async with conn.transaction():
            row = await db.fetch_one(
                conn, db.QUERIES["customer_configure"], args.customer, args.stripe_customer,
                args.auto_reload, args.reload_threshold, args.reload_tokens, args.reload_price,
                args.currency, args.low_balance_threshold,
            )  # fmt: skip
            if row["auto_reload_enabled"]:
                missing = [
                    flag
                    for flag, column in (
                        ("--stripe-customer", "stripe_customer_id"),
                        ("--reload-threshold", "reload_threshold"),
                        ("--reload-tokens", "reload_tokens"),
                        ("--reload-price", "reload_price"),
                        ("--currency", "reload_currency"),
                    )
                    if row[column] is None
                ]
                if missing:
                    raise UsageError(f"auto-reload needs {', '.join(missing)}; nothing changed")
    finally:
        await conn.close()
    emit_object(dict(row.items()), args.format, title=f"customer {args.customer}")
    return 0


async def payment_setup_command(settings: Settings, args: argparse.Namespace) -> int:
    """The Stripe customer (created and linked when missing) and a SetupIntent whose client
    secret the browser confirms the card with (``stripe.confirmSetup``)."""
    import stripe

    from workers.ops.payment_setup import payment_setup
    from workers.stripe_gateway import StripeGateway

    pool = await db.create_pool(settings.dsn, min_size=1, max_size=2)
    gateway = StripeGateway(settings, Metrics())
    try:
        started = await payment_setup(pool, gateway, args.customer)
    except stripe.StripeError as exc:
        raise ChargelineError(
            f"Stripe refused the setup: {exc.code or type(exc).__name__}: {exc.user_message}"
        ) from None
    finally:
        await gateway.close()
        await pool.close()
    emit_object(started, args.format, title=f"payment setup for {args.customer}")
    return 0


class TopupFailed(ChargelineError):
    """The top-up was not charged."""


async def credits_topup(settings: Settings, args: argparse.Namespace) -> int:
    """A manual top-up through the same path as auto-reload: a request, then the processor."""
    pool = await db.create_pool(settings.dsn, min_size=1, max_size=2)
    try:
        reload_id = str(uuid.uuid4())
        async with pool.acquire() as conn:
            if not await conn.fetchval(
                "SELECT stripe_customer_id FROM customers WHERE customer_ref = $1", args.customer
            ):
                raise UsageError(
                    f"customer {args.customer!r} has no Stripe customer: "
                    "run `chargeline customers configure --stripe-customer` first"
                )
            await conn.execute(
                db.QUERIES["reload_request_manual"], reload_id, args.customer, args.tokens,
                args.price, args.currency,
            )  # fmt: skip
        processor = ReloadProcessor(settings, pool, Metrics())
        claimed = await processor.claim(1, reload_id)
        try:
            outcome = await processor.process(claimed[0])
        finally:
            await processor.gateway.close()
        async with pool.acquire() as conn:
            row = await conn.fetchrow(db.QUERIES["reload_show"], reload_id)
            assert row is not None  # created above, in this command
            balance = await conn.fetchval(
                "SELECT balance FROM customers WHERE customer_ref = $1", args.customer
            )
    finally:
        await pool.close()
    if outcome.status != "succeeded":
        raise TopupFailed(
            f"top-up {reload_id} {outcome.status}: {outcome.stripe_code or ''} "
            f"{outcome.message or ''}".strip()
        )
    emit_object({**dict(row.items()), "balance": balance}, args.format, title="top-up")
    return 0
