"""``chargeline webhooks add|list|remove|deliveries|resend``: the endpoints alerts are
POSTed to, and their deliveries. A new endpoint's signing secret is printed once."""

from __future__ import annotations

import argparse

from schemas.outputs import ALERT_TYPES
from workers import db, webhook_signing
from workers.cli.args import Parser, add_actions, add_format, positive_int
from workers.cli.database import connect, fetch_rows
from workers.cli.output import emit_object, emit_rows
from workers.errors import ChargelineError, NotFoundError, UsageError
from workers.settings import Settings

ENDPOINT_COLUMNS = ["id", "url", "events", "created_at", "pending", "failed", "last_delivered_at"]
DELIVERY_COLUMNS = [
    "id",
    "endpoint_id",
    "alert_id",
    "customer_ref",
    "event_type",
    "status",
    "attempts",
    "next_attempt_at",
    "last_status",
    "last_error",
    "created_at",
    "delivered_at",
]
STATUSES = ("pending", "succeeded", "failed")
MAX_ID = 2**63 - 1


def _id(text: str) -> int:
    value = positive_int(text)
    if value > MAX_ID:
        raise argparse.ArgumentTypeError(f"expected a number <= {MAX_ID}, got {value}")
    return value


def add_webhooks(nouns: argparse._SubParsersAction[Parser]) -> None:
    actions = add_actions(nouns, "webhooks")
    add = actions.add_parser("add", help="a new endpoint; its signing secret is printed once")
    add.add_argument("url", metavar="URL", help="http:// or https:// URL the alerts are POSTed to")
    add.add_argument(
        "--event",
        action="append",
        choices=ALERT_TYPES,
        dest="events",
        metavar="TYPE",
        help="an alert type to deliver (repeatable; default every type): " + ", ".join(ALERT_TYPES),
    )
    add_format(add, csv=False)
    add.set_defaults(run=webhooks_add)
    listing = actions.add_parser("list", help="live endpoints with their delivery counts")
    add_format(listing)
    listing.set_defaults(run=webhooks_list)
    remove = actions.add_parser("remove", help="remove an endpoint; its pending deliveries fail")
    remove.add_argument("endpoint_id", type=_id, metavar="ID")
    add_format(remove, csv=False)
    remove.set_defaults(run=webhooks_remove)
    deliveries = actions.add_parser("deliveries", help="deliveries, newest first")
    deliveries.add_argument("--endpoint", type=_id, metavar="ID", help="only this endpoint's")
    deliveries.add_argument("--status", choices=STATUSES, help="only deliveries in this status")
    deliveries.add_argument("--limit", type=positive_int, default=100, help="rows (default 100)")
    add_format(deliveries)
    deliveries.set_defaults(run=webhooks_deliveries)
    resend = actions.add_parser("resend", help="send a delivery again, at once")
    resend.add_argument("delivery_id", type=_id, metavar="DELIVERY_ID")
    add_format(resend, csv=False)
    resend.set_defaults(run=webhooks_resend)


async def webhooks_add(settings: Settings, args: argparse.Namespace) -> int:
    problem = webhook_signing.url_problem(args.url)
    if problem is not None:
        raise UsageError(f"{problem}: {args.url[:100]!r}")
    events = None if not args.events else sorted(set(args.events))
    secret = webhook_signing.new_secret()
    conn = await connect(settings)
    try:
        row = await db.fetch_one(
            conn, db.QUERIES["webhook_endpoint_create"], args.url, secret, events
        )
    finally:
        await conn.close()
    created = {
        "id": row["id"],
        "url": row["url"],
        "events": None if row["events"] is None else list(row["events"]),
        "created_at": row["created_at"],
        "secret": secret,
    }
    emit_object(created, args.format, title="Webhook endpoint added (the secret is shown only now)")
    return 0


async def webhooks_list(settings: Settings, args: argparse.Namespace) -> int:
    rows = await fetch_rows(settings, "webhook_endpoint_list")
    emit_rows(rows, args.format, columns=ENDPOINT_COLUMNS, title="Webhook endpoints")
    return 0


async def webhooks_remove(settings: Settings, args: argparse.Namespace) -> int:
    rows = await fetch_rows(settings, "webhook_endpoint_remove", args.endpoint_id)
    if not rows:
        raise NotFoundError(f"no webhook endpoint {args.endpoint_id}")
    emit_object(rows[0], args.format, title="Webhook endpoint removed")
    return 0


async def webhooks_deliveries(settings: Settings, args: argparse.Namespace) -> int:
    rows = await fetch_rows(
        settings, "webhook_delivery_page", args.endpoint, args.status, None, args.limit
    )
    emit_rows(rows, args.format, columns=DELIVERY_COLUMNS, title="Webhook deliveries")
    return 0


async def webhooks_resend(settings: Settings, args: argparse.Namespace) -> int:
    rows = await fetch_rows(settings, "webhook_delivery_resend", args.delivery_id)
    if rows:
        emit_object(rows[0], args.format, title="Webhook delivery due again")
        return 0
    removed = await fetch_rows(settings, "webhook_delivery_endpoint_removed", args.delivery_id)
    if removed and removed[0]["endpoint_removed"]:
        raise ChargelineError(f"delivery {args.delivery_id}'s endpoint was removed")
    raise NotFoundError(f"no webhook delivery {args.delivery_id}")
