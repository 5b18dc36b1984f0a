"""The money in the demo of ``chargeline dev``: a customer whose card is set up at the Stripe
stand-in and whose balance falls below its auto-reload threshold (charged and granted by the
reloads worker), and a payout cut at the end that pays every recorded charge out."""

from __future__ import annotations

import asyncio
import time

import stripe

from workers import db
from workers.jobs.payouts import cut_payouts
from workers.settings import Settings

RELOAD = {"threshold": 1_000, "tokens": 10_000, "price": 1_000, "currency": "USD"}
GOOD_CARD = "4242424242424242"  # Stripe's test card that is always charged


async def start_auto_reload(settings: Settings, customer_ref: str) -> None:
    """A Stripe customer with a card at the stand-in, and auto-reload on for the customer."""
    http = stripe.AIOHTTPClient()
    try:
        client = stripe.StripeClient(
            settings.stripe_api_key.get_secret_value(),
            base_addresses={"api": settings.stripe_api_base or ""},
            http_client=http,
        )
        customer = await client.v1.customers.create_async(
            {"metadata": {"customer_ref": customer_ref}}
        )
        method = await client.v1.payment_methods.create_async(
            {"type": "card",
             "card": {"number": GOOD_CARD, "exp_month": 12, "exp_year": 2031, "cvc": "123"}}
        )  # fmt: skip
        await client.v1.payment_methods.attach_async(method.id, {"customer": customer.id})
        await client.v1.customers.update_async(
            customer.id, {"invoice_settings": {"default_payment_method": method.id}}
        )
    finally:
        await http.close_async()  # type: ignore[no-untyped-call]  # untyped in the SDK
    conn = await db.connect(settings.dsn)
    try:
        await conn.execute(
            db.QUERIES["customer_configure"], customer_ref, customer.id, True,
            RELOAD["threshold"], RELOAD["tokens"], RELOAD["price"], RELOAD["currency"], None,
        )  # fmt: skip
    finally:
        await conn.close()


async def reloads_succeeded(settings: Settings, customer_ref: str, deadline_s: float) -> int:
    """How many auto-reloads of the customer succeeded, waiting up to ``deadline_s`` for one."""
    deadline = time.monotonic() + deadline_s
    while True:
        conn = await db.connect(settings.dsn)
        try:
            done = int(
                await conn.fetchval(
                    "SELECT count(*) FROM reload_requests WHERE customer_ref = $1 "
                    "AND status = 'succeeded'",
                    customer_ref,
                )
            )
        finally:
            await conn.close()
        if done or time.monotonic() > deadline:
            return done
        await asyncio.sleep(0.2)


async def cut_now(settings: Settings) -> tuple[int, int]:
    """Payouts cut at the database's current time: (payouts, charges they pay out)."""
    conn = await db.connect(settings.dsn)
    try:
        cut = await cut_payouts(
            conn, until=None, period=settings.payout_period, topic=settings.topic_payouts
        )
    finally:
        await conn.close()
    return len(cut.payouts), sum(int(p["charge_count"]) for p in cut.payouts)


async def outbox_drained(settings: Settings, deadline_s: float) -> bool:
    """Whether every outbox row was published within ``deadline_s`` (the relay runs)."""
    deadline = time.monotonic() + deadline_s
    while True:
        conn = await db.connect(settings.dsn)
        try:
            left = await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        finally:
            await conn.close()
        if not left:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)
