"""Every Stripe call chargeline makes (charges for reloads and top-ups, payouts), through
the real ``stripe`` SDK (async), timed and counted.

Only Stripe ids pass through here: no card data is ever read, stored or logged.
"""

from __future__ import annotations

import time
from typing import Any

import stripe
from stripe.params import PayoutCreateParams, PayoutListParams

from workers.metrics import Metrics
from workers.settings import Settings


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
