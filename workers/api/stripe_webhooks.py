"""``POST /v1/stripe/webhooks``: Stripe's events, signature checked, recorded once.

No API key: Stripe signs each event with the endpoint's secret
(``CHARGELINE_STRIPE_WEBHOOK_SECRET``), checked by the stripe library with a tolerance of
five minutes either way, so a bad, missing, stale or future-dated signature is 400 and
changes nothing. A valid event is recorded under its id (a redelivery or a replay is
answered 200 and does nothing more) and answered at once; the reloads worker handles it
afterwards (``workers.jobs.stripe_events``), so a slow call back to Stripe never makes
Stripe time out and send it again. Only the fields a handler reads are stored, never card details.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import stripe
from fastapi import APIRouter, Request
from fastapi.responses import Response

from workers.api.bodies import read_body
from workers.api.envelope import ApiError, ok
from workers.api.services import Services
from workers.db import QUERIES
from workers.logs import get_logger
from workers.stripe_gateway import event_summary, event_type_label

router = APIRouter()
log = get_logger("chargeline.api")

TOLERANCE_S = 300
MAX_EVENT_BYTES = 1 << 20


def _signed_in_the_past(header: str) -> bool:
    """The tolerance both ways: the stripe library refuses only a timestamp too old, and a
    signature made for a time to come is as suspect as a stale one."""
    signed_at = next(
        (part.strip()[2:] for part in header.split(",") if part.strip().startswith("t=")), ""
    )
    return signed_at.isdigit() and int(signed_at) <= time.time() + TOLERANCE_S


@router.post(
    "/v1/stripe/webhooks",
    summary="Receive Stripe's events (signed; no API key)",
    openapi_extra={
        "security": [],
        "parameters": [
            {
                "name": "Stripe-Signature",
                "in": "header",
                "required": True,
                "schema": {"type": "string"},
                "description": "t=TIMESTAMP,v1=SIGNATURE, as Stripe sends it",
            }
        ],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
    },
    responses={
        200: {"description": "Recorded (or already recorded: duplicate true)"},
        400: {"description": "invalid_signature or invalid_json: nothing recorded"},
        503: {"description": "webhook_secret_not_set, or Postgres unavailable"},
    },
)
async def receive_stripe_event(request: Request) -> Response:
    services: Services = request.app.state.services
    metrics = services.metrics.stripe_webhook_events
    secret = services.settings.stripe_webhook_secret
    if secret is None:
        log.error("stripe_webhook_secret_not_set")
        raise ApiError(
            503,
            "webhook_secret_not_set",
            "CHARGELINE_STRIPE_WEBHOOK_SECRET is not set: events cannot be verified",
            headers={"Retry-After": "60"},
        )
    payload = await read_body(request, MAX_EVENT_BYTES)
    header = request.headers.get("stripe-signature", "")
    try:
        stripe.WebhookSignature.verify_header(
            payload.decode("utf-8", "replace"), header, secret.get_secret_value(), TOLERANCE_S
        )
        verified = _signed_in_the_past(header)
    except stripe.SignatureVerificationError:
        verified = False
    if not verified:
        metrics.labels(type="unknown", outcome="bad_signature").inc()
        log.warning("stripe_webhook_bad_signature")
        raise ApiError(400, "invalid_signature", "the Stripe-Signature header does not verify")
    parsed = _event_of(payload)
    if parsed is None:
        metrics.labels(type="unknown", outcome="malformed").inc()
        raise ApiError(400, "invalid_json", "the body is not a Stripe event")
    event_id, kind, obj, created = parsed
    summary = event_summary(obj)
    recorded = await services.fetchval(
        QUERIES["stripe_event_record"], event_id, kind, summary.get("id"),
        orjson.dumps(summary).decode(),
        float(created) if isinstance(created, int | float) else None,
    )  # fmt: skip
    outcome = "recorded" if recorded is not None else "duplicate"
    metrics.labels(type=event_type_label(kind), outcome=outcome).inc()
    log.info("stripe_event_received", stripe_event=event_id, type=kind, outcome=outcome)
    return ok(request, {"event_id": event_id, "type": kind, "duplicate": recorded is None})


def _event_of(payload: bytes) -> tuple[str, str, dict[str, Any], Any] | None:
    """(id, type, data.object, created) of a Stripe event; None when it is not one."""
    try:
        event = orjson.loads(payload)
        obj = event["data"]["object"]
        event_id, kind = event["id"], event["type"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    if not (isinstance(obj, dict) and isinstance(event_id, str) and isinstance(kind, str)):
        return None
    return event_id, kind, obj, event.get("created")
