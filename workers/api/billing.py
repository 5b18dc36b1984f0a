"""Money-moving requests (scope billing): auto-reload settings, and top-ups with an
Idempotency-Key, both on the CLI's paths (SPEC sections 6 and 12).

``PUT /v1/customers/{customer_ref}/credits/auto-reload`` runs ``customers configure``'s
statement: absent (or null) fields keep their value; turning auto-reload on needs a Stripe
customer, threshold, tokens, price and currency, else 422 ``auto_reload_incomplete`` naming
what is missing, and nothing changes.

``POST /v1/customers/{customer_ref}/credits/topup`` creates a manual reload request, which
the reloads worker charges off session (Stripe idempotency key derived from the request id)
and grants, as ``chargeline credits topup``'s request is. The API itself never calls
Stripe. The ``Idempotency-Key`` (1-255 printable ASCII characters) is kept in Postgres per
(key, route) with a hash of the request (customer and body): the first request with a key
creates the reload request in the transaction that stores the key, and a concurrent one
waits on the key's unique index, then finds it and waits for the same reload. The answer
once final (200 granted, 402 declined) is stored and given to every later request with that
key and request; the same key with another request is 409 ``idempotency_key_reused``. While
the reload is not settled within the wait (``Prefer: wait=N``, N <= 30, default 10 s), the
answer is 202 with the top-up id, not stored: the same request later answers the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
import stripe
from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from schemas.common import MAX_QUANTITY, Amount, Tokens
from schemas.currency import CurrencyCode
from workers import db, stripe_gateway
from workers.api.auth import key_of, scoped_router
from workers.api.bodies import json_body, parse_body
from workers.api.envelope import ApiError, ok
from workers.api.paging import Ref
from workers.api.services import Key, Services, unavailable
from workers.db import QUERIES
from workers.ops.payment_setup import payment_setup

router = scoped_router("billing")

TOPUP_ROUTE = "POST /v1/customers/{customer_ref}/credits/topup"
MAX_IDEMPOTENCY_KEY_LENGTH = 255  # Stripe's
DEFAULT_WAIT_S = 10
MAX_WAIT_S = 30
_POLL_FIRST_S = 0.05
_POLL_MAX_S = 0.5
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d+)", re.IGNORECASE)
_REPLAYED = {"Idempotent-Replayed": "true"}


class AutoReloadSettings(BaseModel):
    """Auto-reload, as ``customers configure``: absent or null fields keep their value."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, title="AutoReloadSettings")

    enabled: bool
    threshold: Annotated[int, Field(ge=0, le=MAX_QUANTITY)] | None = Field(
        default=None, description="Reload when the balance falls below this many tokens."
    )
    tokens: Tokens | None = Field(default=None, description="Tokens each reload adds.")
    price: Amount | None = Field(
        default=None, description="What each reload is charged, in the currency's minor units."
    )
    currency: CurrencyCode | None = None


class TopupRequest(BaseModel):
    """A manual top-up: ``tokens`` granted once ``price`` (minor units) is charged."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, title="TopupRequest")

    tokens: Tokens
    price: Amount
    currency: CurrencyCode


# --- card setup -------------------------------------------------------------------------------


@router.post(
    "/v1/customers/{customer_ref:id}/payment-setup",
    summary="Start collecting a customer's card for later charges",
    responses={
        200: {"description": "{customer_ref, stripe_customer, setup_intent, client_secret}"},
        502: {"description": "stripe_error: Stripe refused a call (its code in the message)"},
    },
)
async def start_payment_setup(request: Request, customer_ref: Ref) -> Response:
    """The Stripe customer is created when ours has none (``metadata.customer_ref`` names
    ours) and linked at once; then a SetupIntent with ``usage=off_session``, whose
    ``client_secret`` the browser passes to ``stripe.confirmSetup``. Once Stripe sends
    ``setup_intent.succeeded``, the card is the one auto-reloads and top-ups charge."""
    services: Services = request.app.state.services
    if services.pool is None:
        raise unavailable("Postgres")
    try:
        started = await payment_setup(services.pool, services.stripe, customer_ref)
    except stripe.StripeError as exc:
        if stripe_gateway.is_transient(exc):
            raise unavailable("Stripe") from exc
        raise ApiError(
            502, "stripe_error", f"Stripe refused the setup: {exc.code or type(exc).__name__}"
        ) from exc
    return ok(request, started)


# --- auto-reload ------------------------------------------------------------------------------

_REQUIRED_FOR_AUTO_RELOAD = (
    ("stripe_customer", "stripe_customer_id"),
    ("threshold", "reload_threshold"),
    ("tokens", "reload_tokens"),
    ("price", "reload_price"),
    ("currency", "reload_currency"),
)


def _auto_reload(row: db.Row) -> dict[str, Any]:
    return {
        "customer_ref": row["customer_ref"],
        "enabled": row["auto_reload_enabled"],
        "threshold": row["reload_threshold"],
        "tokens": row["reload_tokens"],
        "price": row["reload_price"],
        "currency": row["reload_currency"],
    }


@router.put(
    "/v1/customers/{customer_ref:id}/credits/auto-reload",
    summary="Set a customer's auto-reload",
    openapi_extra=json_body(AutoReloadSettings),
    responses={
        200: {"description": "The customer's auto-reload settings"},
        422: {"description": "auto_reload_incomplete (naming what is missing) or invalid_request"},
    },
)
async def set_auto_reload(request: Request, customer_ref: Ref) -> Response:
    services: Services = request.app.state.services
    body = await parse_body(request, AutoReloadSettings)
    async with _transaction(services) as conn:
        row = await db.fetch_one(
            conn, QUERIES["customer_configure"], customer_ref, None, body.enabled,
            body.threshold, body.tokens, body.price, body.currency, None,
        )  # fmt: skip
        if row["auto_reload_enabled"]:
            missing = [name for name, column in _REQUIRED_FOR_AUTO_RELOAD if row[column] is None]
            if missing:  # raised inside the transaction: nothing changed
                needs = ", ".join(
                    "a Stripe customer (payment-setup)" if name == "stripe_customer" else name
                    for name in missing
                )
                raise ApiError(
                    422,
                    "auto_reload_incomplete",
                    f"auto-reload needs {needs}; nothing changed",
                    param=missing[0],
                )
    return ok(request, _auto_reload(row))


# --- top-ups ----------------------------------------------------------------------------------

# Read from the request by the route (a missing key is a 400 of its own, not a 422).
_TOPUP_HEADERS = [
    {
        "name": "Idempotency-Key",
        "in": "header",
        "required": True,
        "description": "1-255 printable ASCII characters, one value per top-up: the same key "
        "and body give the same answer, the same key with another body 409.",
        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY_LENGTH},
    },
    {
        "name": "Prefer",
        "in": "header",
        "required": False,
        "description": f"wait=N: wait up to N <= {MAX_WAIT_S} s for Stripe's answer before a "
        f"202 (default {DEFAULT_WAIT_S}).",
        "schema": {"type": "string", "examples": ["wait=5"]},
    },
]


@router.post(
    "/v1/customers/{customer_ref:id}/credits/topup",
    summary="Top up a customer's credits, charged off session through Stripe",
    openapi_extra={**json_body(TopupRequest), "parameters": _TOPUP_HEADERS},
    responses={
        200: {"description": "Granted: {topup_id, balance, topped_up, currency, payment_id}"},
        202: {"description": "Stripe has not answered yet: {topup_id, status: pending}"},
        400: {"description": "idempotency_key_missing, idempotency_key_invalid"},
        402: {"description": "Declined: the code is Stripe's (card_declined, ...)"},
        409: {"description": "idempotency_key_reused"},
        422: {"description": "no_stripe_customer or invalid_request"},
    },
)
async def topup(
    request: Request,
    customer_ref: Ref,
) -> Response:
    services: Services = request.app.state.services
    key = key_of(request)
    idempotency = _idempotency_key(request.headers.get("idempotency-key"))
    body = await parse_body(request, TopupRequest)
    digest = hashlib.sha256(
        orjson.dumps(
            {"customer_ref": customer_ref, **body.model_dump()}, option=orjson.OPT_SORT_KEYS
        )
    ).digest()
    reload_id, stored = await _claim(services, idempotency, digest, customer_ref, body, key)
    if stored is not None:
        return _stored_answer(request, *stored, headers=_REPLAYED)
    state = await _settled(services, reload_id, _wait_s(request.headers.get("prefer")))
    if state is None:
        pending = {
            "topup_id": reload_id,
            "status": "pending",
            "tokens": body.tokens,
            "price": body.price,
            "currency": body.currency,
        }
        return ok(request, pending, 202)
    status, document = await _outcome(services, state)
    answer = await services.fetchrow(
        QUERIES["api_idempotency_answer"],
        idempotency,
        TOPUP_ROUTE,
        status,
        orjson.dumps(document).decode(),
    )
    if answer is None:  # nothing deletes keys: cannot happen
        raise ApiError(500, "internal_error", "the idempotency key went missing")
    return _stored_answer(request, answer["response_status"], answer["response_body"])


def _idempotency_key(value: str | None) -> str:
    if value is None or not value.strip():
        raise ApiError(
            400,
            "idempotency_key_missing",
            "send an Idempotency-Key header: one unique value per top-up",
            param="Idempotency-Key",
        )
    if len(value) > MAX_IDEMPOTENCY_KEY_LENGTH or not value.isascii() or not value.isprintable():
        raise ApiError(
            400,
            "idempotency_key_invalid",
            f"the Idempotency-Key should be 1-{MAX_IDEMPOTENCY_KEY_LENGTH} printable ASCII "
            "characters",
            param="Idempotency-Key",
        )
    return value


def _wait_s(prefer: str | None) -> float:
    match = _PREFER_WAIT.search(prefer or "")
    return float(DEFAULT_WAIT_S if match is None else min(int(match.group(1)), MAX_WAIT_S))


@contextlib.asynccontextmanager
async def _transaction(services: Services) -> AsyncIterator[db.Connection]:
    """A connection in a transaction; an outage is a 503 (through the app's handler)."""
    if services.pool is None:
        raise unavailable("Postgres")
    async with services.pool.acquire(timeout=5) as conn, conn.transaction():
        yield conn


async def _claim(
    services: Services,
    idempotency: str,
    digest: bytes,
    customer_ref: str,
    body: TopupRequest,
    key: Key,
) -> tuple[str, tuple[int, Any] | None]:
    """The reload request of this key, created if the key is new; and the stored answer
    when there is one already."""
    new_id = str(uuid.uuid4())
    async with _transaction(services) as conn:
        claimed = await conn.fetchval(
            QUERIES["api_idempotency_claim"], idempotency, TOPUP_ROUTE, digest, new_id, key.key_id
        )
        if claimed is None:
            row = await db.fetch_one(
                conn, QUERIES["api_idempotency_show"], idempotency, TOPUP_ROUTE
            )
            if bytes(row["request_hash"]) != digest:
                raise ApiError(
                    409,
                    "idempotency_key_reused",
                    "this Idempotency-Key was used with another request; use a new key",
                    param="Idempotency-Key",
                )
            stored = row["response_status"]
            return str(row["reload_id"]), (
                None if stored is None else (stored, row["response_body"])
            )
        if not await conn.fetchval(QUERIES["api_topup_customer"], customer_ref):
            raise ApiError(  # the transaction rolls back: the key is not kept
                422,
                "no_stripe_customer",
                f"customer {customer_ref!r} has no Stripe customer: set up a payment method "
                "first (payment-setup)",
                param="customer_ref",
            )
        await conn.execute(
            QUERIES["reload_request_manual"], new_id, customer_ref, body.tokens, body.price,
            body.currency,
        )  # fmt: skip
    return new_id, None


async def _settled(services: Services, reload_id: str, wait_s: float) -> db.Row | None:
    """The reload request once succeeded or failed; None if still open after ``wait_s``."""
    deadline = time.monotonic() + wait_s
    delay = _POLL_FIRST_S
    while True:
        row = await services.fetchrow(QUERIES["api_topup_state"], reload_id)
        if row is None:  # created before this is reached; nothing deletes them
            raise ApiError(500, "internal_error", f"top-up {reload_id} went missing")
        if row["status"] in ("succeeded", "failed"):
            return row
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        await asyncio.sleep(min(delay, left))
        delay = min(delay * 2, _POLL_MAX_S)


async def _outcome(services: Services, state: db.Row) -> tuple[int, dict[str, Any]]:
    """(status, document) of a settled top-up: the data of a 200, the error of a 402."""
    topup_id = str(state["reload_id"])
    if state["status"] == "succeeded":
        balance = await services.fetchval(
            QUERIES["api_topup_balance"], state["customer_ref"], state["payment_intent_id"]
        )
        return 200, {
            "topup_id": topup_id,
            "status": "succeeded",
            "balance": balance,
            "topped_up": state["tokens"],
            "price": state["price"],
            "currency": state["currency"],
            "payment_id": state["payment_intent_id"],
        }
    code = state["stripe_code"] or "card_declined"
    detail = state["stripe_message"] or code
    return 402, {
        "type": "payment_error",
        "code": code,
        "message": f"top-up {topup_id} was not charged: {detail}",
    }


def _stored_answer(
    request: Request, status: int, document: Any, *, headers: dict[str, str] | None = None
) -> Response:
    body = orjson.loads(document) if isinstance(document, str) else document
    if status >= 400:
        raise ApiError(
            status,
            str(body["code"]),
            str(body["message"]),
            param=body.get("param"),
            error_type=body.get("type"),
            headers=headers,
        )
    response = ok(request, body, status)
    response.headers.update(headers or {})
    return response
