"""Auto-reload and manual top-ups: charge the customer through Stripe, then grant tokens.

A reload request is created in the usage worker's transaction (auto) or by
``chargeline credits topup`` (manual). This worker claims it with a lease and:

1. finds the PaymentIntent an earlier attempt may have created (a retry after a crash),
   else creates one off session with an idempotency key derived from the reload id;
2. on success, in one transaction: a grant (``source: auto_reload``, reference = the
   PaymentIntent id, unique) through the ledger, the request marked succeeded, the
   failure count reset, ``auto_reload_succeeded`` written to the outbox;
3. on a decline or another permanent Stripe error: the request marked failed with Stripe's
   code, ``auto_reload_failed``; the third failure in a row turns auto-reload off
   (``auto_reload_disabled``). Network errors, rate limits and 5xx are retried with
   back-off and are not failures.

A crash between the Stripe call and step 2 leaves the request ``charging``; when its lease
runs out it is claimed again, step 1 finds the PaymentIntent, and the tokens are granted
without a second charge.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from dataclasses import dataclass
from decimal import Context, Decimal, localcontext
from typing import Any

import stripe
from pydantic import ValidationError

from schemas.currency import minor_unit_exponent
from schemas.events import CreditGrantEvent, canonical_json
from workers import db, stripe_gateway
from workers.db import Pool, Row, fetch_one
from workers.jobs.stripe_events import StripeEventHandler
from workers.ledger.rules import ALERT_NAMESPACE, Alert, AlertKind, Grant
from workers.ledger.store import load_ledger, record_alerts, write_ledger
from workers.lifecycle import PeriodicWorker
from workers.logs import get_logger
from workers.metrics import Metrics
from workers.retry import Stopping, retry_transient
from workers.settings import Settings
from workers.stripe_gateway import StripeGateway

log = get_logger("chargeline.reloads")

MAX_CONSECUTIVE_FAILURES = 3


def cost_basis(price_minor: int, currency: str, tokens: int) -> Decimal:
    """Price of one token in the currency's major unit: 1000 JPY for 100 tokens is 10;
    10.000 KWD (10000 minor units) for 1000 tokens is 0.01. Rounded to 18 decimals, with
    the precision that needs (up to 13 digits before the point)."""
    with localcontext(Context(prec=60)):
        major = Decimal(price_minor).scaleb(-minor_unit_exponent(currency))
        return (major / Decimal(tokens)).quantize(Decimal(1).scaleb(-18)).normalize()


def grant_event(request: Row, intent_id: str) -> CreditGrantEvent:
    """The grant a reload adds once paid; raises ValidationError for a reload no grant can
    carry (its tokens or price out of range), which ``process`` checks before any charge."""
    source = "auto_reload" if request["kind"] == "auto" else "manual"
    return CreditGrantEvent.model_validate(
        {
            "type": "credit_grant",
            "customer_ref": request["customer_ref"],
            "reference": intent_id,
            "tokens": request["tokens"],
            "cost_basis": cost_basis(request["price"], request["currency"], request["tokens"]),
            "currency": request["currency"],
            "source": source,
            "description": f"{source} {request['reload_id']}",
        }
    )


class NoPaymentMethod(Exception):
    """The Stripe customer has no default payment method to charge off session."""


@dataclass(frozen=True)
class Outcome:
    reload_id: str
    status: str  # succeeded | failed | retry_later
    payment_intent_id: str | None = None
    stripe_code: str | None = None
    message: str | None = None


class ReloadProcessor:
    """Processes one claimed reload request; shared by the worker and `credits topup`."""

    def __init__(self, settings: Settings, pool: Pool, metrics: Metrics) -> None:
        self.settings = settings
        self.pool = pool
        self.metrics = metrics
        self.gateway = StripeGateway(settings, metrics)

    async def claim(self, limit: int, reload_id: str | None = None) -> list[Any]:
        async with self.pool.acquire() as conn:
            return list(
                await conn.fetch(
                    db.QUERIES["claim_reloads"], limit, self.settings.reload_lease_s, reload_id
                )
            )

    async def process(  # noqa: PLR0911 -- one return per way a Stripe charge can end
        self, request: Row, *, stopping: asyncio.Event | None = None
    ) -> Outcome:
        reload_id = str(request["reload_id"])
        bound = log.bind(reload_id=reload_id, customer_ref=request["customer_ref"])
        if not request["stripe_customer_id"]:
            return await self.fail(request, None, "no_stripe_customer", "customer has no Stripe id")
        try:  # never charge for what cannot be granted (written before the bounds held)
            grant_event(request, "pi_check")
        except (ValidationError, ArithmeticError) as exc:
            bound.error("reload_invalid", tokens=request["tokens"], price=request["price"])
            return await self.fail(request, None, "invalid_reload", str(exc).splitlines()[0])
        # Once a create has been sent, its answer may be lost (a timeout) while Stripe did
        # charge: from then on every try looks for the intent before creating one.
        sent = [request["attempts"] > 1 or bool(request["payment_intent_id"])]
        try:
            intent = await retry_transient(
                lambda: self._charge(request, sent),
                is_transient=stripe_gateway.is_transient,
                component="stripe",
                settings=self.settings,
                metrics=self.metrics,
                stopping=stopping,
            )
        except Stopping:
            return Outcome(reload_id, "retry_later", message="stopping while Stripe failed")
        except stripe.CardError as exc:
            intent_id = _intent_id_of(exc)
            bound.info("reload_declined", code=exc.code, payment_intent=intent_id)
            return await self.fail(
                request, intent_id, exc.code or "card_declined", exc.user_message
            )
        except NoPaymentMethod:
            return await self.fail(
                request, None, "no_default_payment_method", "no default payment method"
            )
        except stripe.StripeError as exc:
            bound.warning("reload_error", error=type(exc).__name__, code=exc.code)
            return await self.fail(request, None, exc.code or type(exc).__name__, exc.user_message)
        if intent["status"] == "processing":  # Stripe's payment_intent.* event settles it
            bound.info("reload_processing", payment_intent=intent["id"])
            return Outcome(reload_id, "retry_later", payment_intent_id=intent["id"])
        if intent["status"] == "requires_action":
            # The card wants its holder (3-D Secure), who is not there: never granted. The
            # intent is cancelled so that it cannot succeed after the reload has failed.
            await self._cancel(intent["id"], stopping)
            return await self.fail(
                request, intent["id"], "authentication_required",
                "the card needs the customer to authenticate the payment",
            )  # fmt: skip
        if intent["status"] != "succeeded":
            error = intent.get("last_payment_error") or {}
            return await self.fail(
                request, intent["id"], error.get("code") or intent["status"], error.get("message")
            )
        await self.succeed(request, intent["id"])
        bound.info("reload_succeeded", payment_intent=intent["id"], tokens=request["tokens"])
        return Outcome(reload_id, "succeeded", payment_intent_id=intent["id"])

    async def _cancel(self, intent_id: str, stopping: asyncio.Event | None) -> None:
        try:
            await retry_transient(
                lambda: self.gateway.cancel_payment_intent(intent_id),
                is_transient=stripe_gateway.is_transient,
                component="stripe",
                settings=self.settings,
                metrics=self.metrics,
                stopping=stopping,
            )
        except (Stopping, stripe.StripeError) as exc:  # already cancelled, or stopping
            log.warning("payment_intent_not_cancelled", payment_intent=intent_id, error=repr(exc))

    async def _charge(self, request: Row, sent: list[bool]) -> Any:
        reload_id = str(request["reload_id"])
        customer = request["stripe_customer_id"]
        if sent[0]:
            earlier = await self.gateway.find_payment_intent(customer, reload_id)
            if earlier is not None:
                return earlier
        method = await self.gateway.default_payment_method(customer)
        if method is None:
            raise NoPaymentMethod()
        sent[0] = True
        return await self.gateway.charge(
            reload_id=reload_id,
            stripe_customer=customer,
            payment_method=method,
            amount=request["price"],
            currency=request["currency"],
            customer_ref=request["customer_ref"],
        )

    async def succeed(self, request: Row, intent_id: str) -> None:
        customer_ref = request["customer_ref"]
        event = grant_event(request, intent_id)
        source, basis = event.source, event.cost_basis
        payload = canonical_json(event)
        async with self.pool.acquire() as conn, conn.transaction():
            ledger = await load_ledger(conn, [customer_ref])
            row = await conn.fetchrow(
                db.QUERIES["reload_insert_grant"],
                customer_ref,
                intent_id,
                request["tokens"],
                basis,
                request["currency"],
                source,
                event.description,
                hashlib.sha256(payload).digest(),
                payload.decode(),
            )
            before = ledger.customers[customer_ref].balance
            if row is not None:  # else: granted by an earlier attempt that then died
                grant = Grant(
                    row["grant_id"],
                    intent_id,
                    request["tokens"],
                    0,
                    row["effective_at"],
                    None,
                    0,
                    basis,
                    "pending",
                )
                ledger.grant(customer_ref, grant, intent_id)
            if request["kind"] == "auto":
                ledger.changes.alerts.append(
                    self._alert(
                        request,
                        "auto_reload_succeeded",
                        before,
                        ledger.customers[customer_ref].balance,
                        intent_id,
                        None,
                    )
                )
            await write_ledger(conn, ledger, alerts_topic=self.settings.topic_alerts)
            await conn.execute(db.QUERIES["reload_succeeded"], request["reload_id"], intent_id)
            await conn.execute(db.QUERIES["reload_reset_failures"], customer_ref)
        self.metrics.reloads.labels(result="succeeded").inc()
        for alert in ledger.changes.alerts:
            self.metrics.alerts.labels(type=alert.type).inc()

    async def fail(
        self, request: Row, intent_id: str | None, code: str, message: str | None
    ) -> Outcome:
        reload_id = str(request["reload_id"])
        alerts: list[Alert] = []
        async with self.pool.acquire() as conn, conn.transaction():
            failed = await conn.fetchval(
                db.QUERIES["reload_failed"], request["reload_id"], intent_id, code, message
            )
            if failed is None:  # concluded already (by a Stripe event, or the worker)
                return Outcome(reload_id, "failed", intent_id, code, message)
            if request["kind"] == "auto":
                row = await fetch_one(
                    conn,
                    db.QUERIES["reload_count_failure"],
                    request["customer_ref"],
                    MAX_CONSECUTIVE_FAILURES,
                )
                detail = {"stripe_code": code, "failures_in_a_row": row["reload_failures"]}
                alerts.append(
                    self._alert(
                        request,
                        "auto_reload_failed",
                        row["balance"],
                        row["balance"],
                        intent_id,
                        detail,
                    )
                )
                if not row["auto_reload_enabled"]:
                    alerts.append(
                        self._alert(
                            request,
                            "auto_reload_disabled",
                            row["balance"],
                            row["balance"],
                            intent_id,
                            detail,
                        )
                    )
                now = await conn.fetchval("SELECT now()")
                await record_alerts(conn, alerts, now, alerts_topic=self.settings.topic_alerts)
        disabled = any(a.type == "auto_reload_disabled" for a in alerts)
        self.metrics.reloads.labels(result="failed").inc()
        if disabled:
            self.metrics.reloads.labels(result="disabled").inc()
        for alert in alerts:
            self.metrics.alerts.labels(type=alert.type).inc()
        log.warning("reload_failed", reload_id=reload_id, code=code, auto_reload_disabled=disabled)
        return Outcome(reload_id, "failed", intent_id, code, message)

    def _alert(
        self,
        request: Row,
        kind: AlertKind,
        before: int,
        after: int,
        intent_id: str | None,
        detail: dict[str, Any] | None,
    ) -> Alert:
        reload_id = str(request["reload_id"])
        return Alert(
            alert_id=str(uuid.uuid5(ALERT_NAMESPACE, f"{reload_id}\x1f{kind}")),
            type=kind,
            customer_ref=request["customer_ref"],
            balance=after,
            previous_balance=before,
            threshold=request["reload_threshold"],
            cause_type="auto_reload",
            cause_reference=intent_id or reload_id,
            seq=None,
            detail={"reload_id": reload_id, "tokens": request["tokens"], **(detail or {})},
        )


def _intent_id_of(exc: stripe.CardError) -> str | None:
    error = getattr(exc, "error", None)
    intent = getattr(error, "payment_intent", None) if error is not None else None
    intent_id = getattr(intent, "id", None)
    return None if intent_id is None else str(intent_id)


class ReloadWorker(PeriodicWorker):
    """Handles the Stripe events the API recorded, then claims open reload requests and
    processes them, one at a time per worker."""

    name = "reloads"

    def __init__(self, settings: Settings, pool: Pool, metrics: Metrics) -> None:
        super().__init__(settings, metrics)
        self.processor = ReloadProcessor(settings, pool, metrics)
        self.events = StripeEventHandler(settings, pool, metrics, self.processor)

    @property
    def interval_s(self) -> float:
        return self.settings.reload_interval_s

    async def tick(self) -> bool:
        # Stripe's events first: one may settle a request this round would otherwise retry.
        events = await self.retry(self.events.handle_recorded)
        requests = await self.retry(lambda: self.processor.claim(10))
        for request in requests:
            await self.processor.process(request, stopping=self.stopping)
        return bool(requests) or events > 0

    async def close(self) -> None:
        await self.processor.gateway.close()
