"""Every Stripe call chargeline makes (charges for reloads and top-ups, payouts), through
the real ``stripe`` SDK (async), timed and counted.

Only Stripe ids pass through here: no card data is ever read, stored or logged.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import stripe
from stripe.params import PayoutCreateParams, PayoutListParams, SetupIntentCreateParams

from workers.metrics import Metrics
from workers.settings import Settings


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def is_transient(exc: BaseException) -> bool:
    """Network trouble, rate limits, Stripe's own 5xx and a 409 (a request with the same
    idempotency key still in flight): retry. A decline is an answer."""
    if isinstance(exc, stripe.APIConnectionError | stripe.RateLimitError):
        return True
    if isinstance(exc, stripe.StripeError) and exc.http_status == 409:
        return True
    if isinstance(exc, stripe.APIError) and not isinstance(exc, stripe.CardError):
        status = getattr(exc, "http_status", None)
        return status is None or status >= 500
    return False


class StripeGateway:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        base = {"api": settings.stripe_api_base} if settings.stripe_api_base else None
        self.http = stripe.AIOHTTPClient(timeout=settings.stripe_timeout_s)
        self.client = stripe.StripeClient(
            settings.stripe_api_key.get_secret_value(),
            base_addresses=base,  # type: ignore[arg-type]
            http_client=self.http,
            max_network_retries=0,  # our own back-off, with metrics, retries
        )
        self.metrics = metrics

    async def close(self) -> None:
        await self.http.close_async()  # type: ignore[no-untyped-call]  # untyped in the SDK

    async def _timed(self, call: str, coroutine: Any) -> Any:
        started = time.monotonic()
        outcome = "ok"
        try:
            return await coroutine
        except Exception as exc:
            outcome = type(exc).__name__
            raise
        finally:
            self.metrics.stripe_request_seconds.labels(call=call).observe(
                time.monotonic() - started
            )
            if outcome != "ok":
                self.metrics.stripe_errors.labels(call=call, error=outcome).inc()

    async def default_payment_method(self, stripe_customer: str) -> str | None:
        customer = await self._timed(
            "customers.retrieve", self.client.v1.customers.retrieve_async(stripe_customer)
        )
        settings = customer.to_dict().get("invoice_settings") or {}
        method = settings.get("default_payment_method")
        return None if method is None else str(getattr(method, "id", method))

    async def find_payment_intent(self, stripe_customer: str, reload_id: str) -> Any | None:
        """A PaymentIntent an earlier attempt of this reload created, if any.

        Stripe's idempotency key already makes a retried create return the first intent;
        this covers stand-ins that ignore the key and retries after the key's 24 h."""
        try:
            page = await self._timed(
                "payment_intents.list",
                self.client.v1.payment_intents.list_async(
                    {"customer": stripe_customer, "limit": 100}
                ),
            )
        except stripe.InvalidRequestError:  # stand-ins without the customer filter
            page = await self._timed(
                "payment_intents.list",
                self.client.v1.payment_intents.list_async({"limit": 100}),
            )
        # The newest 100 suffice: the intent, if any, was created by this reload's last try.
        for found in page.data:
            intent = found.to_dict()
            metadata = intent.get("metadata") or {}
            if intent.get("customer") == stripe_customer and metadata.get("reload_id") == reload_id:
                return intent
        return None

    async def charge(
        self,
        *,
        reload_id: str,
        stripe_customer: str,
        payment_method: str,
        amount: int,
        currency: str,
        customer_ref: str,
    ) -> dict[str, Any]:
        """Charge the default payment method off session; raises ``stripe.CardError`` on a
        decline (the intent is then in the error)."""
        intent = await self._timed(
            "payment_intents.create",
            self.client.v1.payment_intents.create_async(
                {
                    "amount": amount,
                    "currency": currency.lower(),
                    "customer": stripe_customer,
                    "payment_method": payment_method,
                    "off_session": True,
                    "confirm": True,
                    "metadata": {"reload_id": reload_id, "customer_ref": customer_ref},
                },
                {"idempotency_key": f"chargeline-reload-{reload_id}"},
            ),
        )
        return dict(intent.to_dict())

    async def cancel_payment_intent(self, intent_id: str) -> None:
        """Cancel an intent left waiting for the customer (``requires_action``), so that it
        cannot succeed after its reload was failed."""
        await self._timed(
            "payment_intents.cancel", self.client.v1.payment_intents.cancel_async(intent_id)
        )

    # --- customers and their cards (SPEC: payment-setup, Stripe's webhooks) ---

    async def create_customer(self, customer_ref: str) -> str:
        """A Stripe customer named after ours (``metadata.customer_ref``). The idempotency key
        makes concurrent or retried setups for one customer create one Stripe customer."""
        customer = await self._timed(
            "customers.create",
            self.client.v1.customers.create_async(
                {"metadata": {"customer_ref": customer_ref}},
                # Ours may hold any printable character; the key is ASCII and short.
                {"idempotency_key": "chargeline-customer-" + _digest(customer_ref)},
            ),
        )
        return str(customer.id)

    async def retrieve_customer(self, stripe_customer: str) -> dict[str, Any]:
        customer = await self._timed(
            "customers.retrieve", self.client.v1.customers.retrieve_async(stripe_customer)
        )
        return dict(customer.to_dict())

    async def create_setup_intent(self, stripe_customer: str, customer_ref: str) -> dict[str, Any]:
        """A SetupIntent that saves a card for charges made later, off session."""
        intent = await self._timed(
            "setup_intents.create",
            self.client.v1.setup_intents.create_async(
                SetupIntentCreateParams(
                    customer=stripe_customer,
                    usage="off_session",
                    metadata={"customer_ref": customer_ref},
                )
            ),
        )
        return dict(intent.to_dict())

    async def payment_method_summary(self, payment_method: str) -> dict[str, str | None]:
        """What may be kept of a payment method: its id, type, brand and last four digits."""
        method = await self._timed(
            "payment_methods.retrieve",
            self.client.v1.payment_methods.retrieve_async(payment_method),
        )
        found = method.to_dict()
        kind = str(found.get("type") or "card")
        details = found.get(kind) or {}
        last4 = str(details.get("last4") or "")
        return {
            "id": str(found["id"]),
            "type": kind,
            "brand": details.get("brand"),
            "last4": last4 if len(last4) == 4 and last4.isdigit() else None,
        }

    async def set_default_payment_method(self, stripe_customer: str, payment_method: str) -> None:
        await self._timed(
            "customers.update",
            self.client.v1.customers.update_async(
                stripe_customer,
                {"invoice_settings": {"default_payment_method": payment_method}},
            ),
        )

    # --- payouts (to a connected account) ---

    async def create_payout(
        self, params: PayoutCreateParams, *, idempotency_key: str, account: str
    ) -> stripe.Payout:
        created: stripe.Payout = await self._timed(
            "payouts.create",
            self.client.v1.payouts.create_async(
                params, options={"idempotency_key": idempotency_key, "stripe_account": account}
            ),
        )
        return created

    async def list_payouts(
        self, params: PayoutListParams, *, account: str
    ) -> stripe.ListObject[stripe.Payout]:
        page: stripe.ListObject[stripe.Payout] = await self._timed(
            "payouts.list",
            self.client.v1.payouts.list_async(params, options={"stripe_account": account}),
        )
        return page


# --- Stripe's events (the webhook endpoint records them, the reloads worker handles them) ---

HANDLED_EVENT_TYPES = frozenset({
    "setup_intent.succeeded", "customer.created", "customer.updated", "customer.deleted",
    "payment_intent.succeeded", "payment_intent.payment_failed",
})  # fmt: skip
_KEPT_METADATA = ("customer_ref", "reload_id")


def event_type_label(kind: str) -> str:
    """The type as a metric label: Stripe has hundreds; the unhandled ones count as one."""
    return kind if kind in HANDLED_EVENT_TYPES else "other"


def event_summary(obj: dict[str, Any]) -> dict[str, Any]:
    """What a handler reads of an event's object: ids, statuses, chargeline's own metadata,
    an error's code. Never a card's details: a payment's object can carry them."""

    def id_of(value: Any) -> Any:
        return value.get("id") if isinstance(value, dict) else value

    metadata = obj.get("metadata") or {}
    summary: dict[str, Any] = {
        "id": obj.get("id"),
        "object": obj.get("object"),
        "customer": id_of(obj.get("customer")),
        "payment_method": id_of(obj.get("payment_method")),
        "status": obj.get("status"),
        "deleted": obj.get("deleted"),
        "metadata": {k: str(metadata[k]) for k in _KEPT_METADATA if k in metadata},
    }
    error = obj.get("last_payment_error")
    if isinstance(error, dict):
        summary["last_payment_error"] = {
            "code": error.get("code"),
            "message": str(error.get("message") or "")[:500] or None,
        }
    settings = obj.get("invoice_settings")
    if isinstance(settings, dict):
        summary["default_payment_method"] = id_of(settings.get("default_payment_method"))
    return {name: value for name, value in summary.items() if value is not None}
