"""Card setup (``POST /v1/customers/{ref}/payment-setup``, ``chargeline customers
payment-setup C``): the Stripe customer created when ours has none, linked at once, then a
SetupIntent for charges made later off session. The browser confirms it with Stripe.js;
Stripe's ``setup_intent.succeeded`` then makes the card the default payment method (the
reloads worker handles the event, ``workers.jobs.stripe_events``).
"""

from __future__ import annotations

from typing import Any

from workers import db
from workers.db import Pool
from workers.logs import get_logger
from workers.stripe_gateway import StripeGateway

log = get_logger("chargeline.payment_setup")


async def payment_setup(pool: Pool, gateway: StripeGateway, customer_ref: str) -> dict[str, Any]:
    """``{customer_ref, stripe_customer, setup_intent, client_secret}``. Stripe errors are
    the caller's to answer; nothing is written before the Stripe customer exists."""
    async with pool.acquire() as conn:
        stripe_customer = await conn.fetchval(db.QUERIES["customer_stripe_id"], customer_ref)
    if not stripe_customer:
        created = await gateway.create_customer(customer_ref)
        async with pool.acquire() as conn:
            stripe_customer = await conn.fetchval(
                db.QUERIES["customer_link_stripe"], customer_ref, created
            )
        log.info("stripe_customer_linked", customer_ref=customer_ref, stripe_customer=created)
    intent = await gateway.create_setup_intent(stripe_customer, customer_ref)
    log.info(
        "payment_setup_started",
        customer_ref=customer_ref,
        stripe_customer=stripe_customer,
        setup_intent=intent["id"],
    )
    return {
        "customer_ref": customer_ref,
        "stripe_customer": stripe_customer,
        "setup_intent": intent["id"],
        "client_secret": intent["client_secret"],
    }
