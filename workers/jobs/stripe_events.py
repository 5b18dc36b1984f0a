"""Stripe's events, handled after the webhook endpoint has recorded them.

``POST /v1/stripe/webhooks`` verifies the signature, records the event once (its id is the
key) and answers; the reloads worker then handles what was recorded, under a lease, so that
the slow part (calls back to Stripe, a grant) is never between Stripe and its answer and a
crash only delays it:

- ``setup_intent.succeeded``: the card becomes the Stripe customer's default payment
  method, and ours (type, brand, last four digits);
- ``customer.created`` / ``customer.updated``: the Stripe customer is linked to ours by
  ``metadata.customer_ref``; an update brings the current default card along (read from
  Stripe, not from the event, which may be older than what was handled before it);
- ``customer.deleted``: auto-reload off, the link and the card forgotten;
- ``payment_intent.succeeded`` / ``payment_intent.payment_failed``: a reload or top-up still
  open (its answer from Stripe lost, or the payment still processing) is settled from it:
  granted exactly once (the grant's reference is the PaymentIntent id) or failed with
  Stripe's code, ``authentication_required`` when the card wanted its holder;
- anything else: recorded, marked ignored.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import orjson

from workers import db, stripe_gateway
from workers.db import Pool
from workers.logs import get_logger
from workers.metrics import Metrics
from workers.settings import Settings
from workers.stripe_gateway import event_type_label

if TYPE_CHECKING:
    from workers.jobs.reloads import ReloadProcessor

log = get_logger("chargeline.stripe_events")

LEASE_S = 60.0
MAX_ATTEMPTS = 10  # then the event is marked failed and left for an operator


class StripeEventHandler:
    def __init__(
        self, settings: Settings, pool: Pool, metrics: Metrics, processor: ReloadProcessor
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.metrics = metrics
        self.processor = processor
        self.gateway = processor.gateway

    async def handle_recorded(self, limit: int = 20) -> int:
        """Handle up to ``limit`` recorded events; how many were claimed."""
        async with self.pool.acquire() as conn:
            events = await conn.fetch(db.QUERIES["stripe_events_claim"], limit, LEASE_S)
        for event in events:
            await self._handle_one(event)
        return len(events)

    async def _handle_one(self, event: db.Row) -> None:
        event_id, kind = event["event_id"], event["type"]
        bound = log.bind(stripe_event=event_id, type=kind)
        try:
            outcome = await self.handle(kind, orjson.loads(event["data"]))
        except Exception as exc:
            transient = stripe_gateway.is_transient(exc) or db.is_transient(exc)
            if transient and event["attempts"] < MAX_ATTEMPTS:
                bound.warning("stripe_event_retried", error=repr(exc), attempts=event["attempts"])
                return  # the lease runs out and the event is claimed again
            outcome = "failed:" + (getattr(exc, "code", None) or type(exc).__name__)
            bound.error("stripe_event_failed", error=repr(exc), attempts=event["attempts"])
        async with self.pool.acquire() as conn:
            await conn.execute(db.QUERIES["stripe_event_handled"], event_id, outcome)
        self.metrics.stripe_webhook_events.labels(
            type=event_type_label(kind), outcome=outcome
        ).inc()
        bound.info("stripe_event_handled", outcome=outcome)

    async def handle(self, kind: str, data: dict[str, Any]) -> str:
        """What was done, as a short outcome (also the metric's label)."""
        if kind == "setup_intent.succeeded":
            return await self._setup_succeeded(data)
        if kind in ("customer.created", "customer.updated"):
            return await self._customer_changed(data, updated=kind == "customer.updated")
        if kind == "customer.deleted":
            return await self._customer_deleted(data)
        if kind in ("payment_intent.succeeded", "payment_intent.payment_failed"):
            return await self._payment_settled(data, succeeded=kind == "payment_intent.succeeded")
        return "ignored"

    # --- cards and customers ---

    async def _customer_ref_of(self, stripe_customer: str) -> str | None:
        """Ours, by the link, else by the Stripe customer's ``metadata.customer_ref`` (then
        linked)."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(db.QUERIES["customer_of_stripe"], stripe_customer)
        if row is not None:
            return str(row["customer_ref"])
        found = await self.gateway.retrieve_customer(stripe_customer)
        customer_ref = (found.get("metadata") or {}).get("customer_ref")
        if not customer_ref or found.get("deleted"):
            return None
        async with self.pool.acquire() as conn:
            linked = await conn.fetchval(
                db.QUERIES["customer_link_stripe"], customer_ref, stripe_customer
            )
        return str(customer_ref) if linked == stripe_customer else None

    async def _setup_succeeded(self, data: dict[str, Any]) -> str:
        stripe_customer, method = data.get("customer"), data.get("payment_method")
        if not stripe_customer or not method:
            return "ignored_incomplete"
        customer_ref = await self._customer_ref_of(stripe_customer)
        if customer_ref is None:
            return "ignored_unknown_customer"
        summary = await self.gateway.payment_method_summary(method)
        await self.gateway.set_default_payment_method(stripe_customer, method)
        await self._store_method(customer_ref, summary)
        log.info(
            "default_payment_method_set",
            customer_ref=customer_ref,
            payment_method=method,
            brand=summary["brand"],
        )
        return "default_payment_method_set"

    async def _customer_changed(self, data: dict[str, Any], *, updated: bool) -> str:
        customer_ref = (data.get("metadata") or {}).get("customer_ref")
        stripe_customer = data.get("id")
        if not customer_ref or not stripe_customer:
            return "ignored_no_customer_ref"
        async with self.pool.acquire() as conn:
            linked = await conn.fetchval(
                db.QUERIES["customer_link_stripe"], customer_ref, stripe_customer
            )
        if linked != stripe_customer:
            log.warning(
                "stripe_customer_not_linked",
                customer_ref=customer_ref,
                stripe_customer=stripe_customer,
                linked=linked,
            )
            return "ignored_linked_elsewhere"
        if not updated:
            return "linked"
        current = await self.gateway.retrieve_customer(stripe_customer)
        method = (current.get("invoice_settings") or {}).get("default_payment_method")
        method_id = None if method is None else str(getattr(method, "id", method))
        if method_id is None:
            await self._store_method(customer_ref, None)
        else:
            await self._store_method(
                customer_ref, await self.gateway.payment_method_summary(method_id)
            )
        return "linked"

    async def _customer_deleted(self, data: dict[str, Any]) -> str:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(db.QUERIES["customer_stripe_deleted"], data.get("id"))
        for row in rows:
            log.warning("stripe_customer_deleted", customer_ref=row["customer_ref"])
        return "auto_reload_disabled" if rows else "ignored_unknown_customer"

    async def _store_method(self, customer_ref: str, summary: dict[str, str | None] | None) -> None:
        values = (None, None, None, None) if summary is None else (
            summary["id"], summary["type"], summary["brand"], summary["last4"],
        )  # fmt: skip
        async with self.pool.acquire() as conn:
            await conn.execute(db.QUERIES["customer_payment_method"], customer_ref, *values)

    # --- payments ---

    async def _payment_settled(  # noqa: PLR0911 -- one return per state a reload can be in
        self, data: dict[str, Any], *, succeeded: bool
    ) -> str:
        reload_id = (data.get("metadata") or {}).get("reload_id")
        intent_id = data.get("id")
        if not reload_id or not intent_id or not _is_uuid(reload_id):
            return "ignored_not_a_reload"
        async with self.pool.acquire() as conn:
            state = await conn.fetchrow(db.QUERIES["reload_show"], reload_id)
        if state is None:
            return "ignored_unknown_reload"
        if state["status"] in ("succeeded", "failed"):
            if succeeded and state["status"] == "failed":
                # Paid but never granted: an operator refunds or grants by hand.
                log.error(
                    "payment_succeeded_after_reload_failed",
                    reload_id=reload_id,
                    payment_intent=intent_id,
                    customer_ref=state["customer_ref"],
                )
                return "paid_after_failure"
            return "already_settled"
        async with self.pool.acquire() as conn:
            request = await conn.fetchrow(db.QUERIES["reload_open"], reload_id)
        if request is None:
            return "already_settled"
        if data.get("customer") != request["stripe_customer_id"]:
            return "ignored_other_customer"
        if succeeded:
            await self.processor.succeed(request, intent_id)
            return "reload_granted"
        error = data.get("last_payment_error") or {}
        code = error.get("code") or "payment_failed"
        if data.get("status") == "requires_action":
            code = "authentication_required"
        await self.processor.fail(request, intent_id, code, error.get("message"))
        return "reload_failed"


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True
