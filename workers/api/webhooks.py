"""Outbound webhooks (scope admin), as ``chargeline webhooks``: endpoints that receive the
alerts, and their deliveries (the same statements, workers/sql/webhooks.sql).

``POST /v1/webhooks`` {url, events?} answers 201 with the endpoint and its ``secret``,
which no other answer shows; ``GET /v1/webhooks`` lists the live endpoints;
``DELETE /v1/webhooks/{endpoint_id}`` removes one (200 with it; its pending deliveries end
failed), 404 ``not_found`` when there is none or it is removed already.
``GET /v1/webhooks/deliveries`` pages through deliveries, newest first (``endpoint_id``,
``status``, ``limit``, ``cursor`` as every list); ``POST
/v1/webhook-deliveries/{delivery_id}/resend`` makes one due again at once (200), 404
``not_found``, 409 ``endpoint_removed``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from schemas.outputs import AlertType
from workers import webhook_signing
from workers.api.auth import scoped_router
from workers.api.bodies import json_body, parse_body
from workers.api.envelope import ApiError, ok
from workers.api.paging import Paging, decode_cursor, encode_cursor, page_of, services_of
from workers.db import QUERIES, Row

router = scoped_router("admin")

DeliveryStatus = Literal["pending", "succeeded", "failed"]
MAX_ID = 2**63 - 1


class WebhookCreate(BaseModel):
    """A new endpoint: where alerts are POSTed, and which types (default: every type)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, title="WebhookCreate")

    url: str = Field(
        min_length=1,
        max_length=webhook_signing.MAX_URL_LENGTH,
        description="http:// or https:// URL with a host, at most 2,000 characters.",
    )
    events: list[AlertType] | None = Field(
        default=None,
        min_length=1,
        description="The alert types to deliver (default, or null: every type).",
    )


def endpoint_document(row: Row) -> dict[str, Any]:
    document = dict(row.items())
    document["events"] = None if row["events"] is None else list(row["events"])
    return document


def delivery_document(row: Row) -> dict[str, Any]:
    document = dict(row.items())
    document["alert_id"] = str(row["alert_id"])
    return document


@router.post(
    "/v1/webhooks",
    status_code=201,
    summary="Add a webhook endpoint; the answer shows its signing secret, once",
    openapi_extra=json_body(WebhookCreate),
    responses={201: {"description": "The endpoint, with its secret"}},
)
async def create_webhook(request: Request) -> Response:
    body = await parse_body(request, WebhookCreate)
    problem = webhook_signing.url_problem(body.url)
    if problem is not None:
        raise ApiError(422, "invalid_request", f"url: {problem}", param="url")
    events = None if body.events is None else sorted(set(body.events))
    secret = webhook_signing.new_secret()
    row = await services_of(request).fetchrow(
        QUERIES["webhook_endpoint_create"], body.url, secret, events
    )
    assert row is not None  # an INSERT ... RETURNING
    return ok(request, {**endpoint_document(row), "secret": secret}, 201)


@router.get(
    "/v1/webhooks", summary="Live webhook endpoints with their delivery counts, newest first"
)
async def list_webhooks(request: Request, page: Paging) -> Response:
    key = decode_cursor(page.cursor, "webhooks", int)
    rows = await services_of(request).fetch(
        QUERIES["webhook_endpoint_page"], None if key is None else key[0], page.limit + 1
    )
    return page_of(
        request, rows, page, endpoint_document, lambda row: encode_cursor("webhooks", row["id"])
    )


@router.delete(
    "/v1/webhooks/{endpoint_id:id}",
    summary="Remove a webhook endpoint; its pending deliveries end failed",
    responses={404: {"description": "not_found"}},
)
async def remove_webhook(
    request: Request, endpoint_id: Annotated[int, Path(ge=1, le=MAX_ID)]
) -> Response:
    row = await services_of(request).fetchrow(QUERIES["webhook_endpoint_remove"], endpoint_id)
    if row is None:
        raise ApiError(404, "not_found", f"no webhook endpoint {endpoint_id}", param="endpoint_id")
    return ok(request, endpoint_document(row))


@router.get("/v1/webhooks/deliveries", summary="Webhook deliveries, newest first")
async def list_deliveries(
    request: Request,
    page: Paging,
    endpoint_id: Annotated[
        int | None, Query(ge=1, le=MAX_ID, description="only this endpoint's deliveries")
    ] = None,
    status: Annotated[DeliveryStatus | None, Query()] = None,
) -> Response:
    key = decode_cursor(page.cursor, "webhook_deliveries", int)
    rows = await services_of(request).fetch(
        QUERIES["webhook_delivery_page"],
        endpoint_id,
        status,
        None if key is None else key[0],
        page.limit + 1,
    )
    return page_of(
        request,
        rows,
        page,
        delivery_document,
        lambda row: encode_cursor("webhook_deliveries", row["id"]),
    )


@router.post(
    "/v1/webhook-deliveries/{delivery_id:id}/resend",
    summary="Send a delivery again, at once, with the whole retry schedule ahead",
    responses={404: {"description": "not_found"}, 409: {"description": "endpoint_removed"}},
)
async def resend_delivery(
    request: Request, delivery_id: Annotated[int, Path(ge=1, le=MAX_ID)]
) -> Response:
    services = services_of(request)
    row = await services.fetchrow(QUERIES["webhook_delivery_resend"], delivery_id)
    if row is not None:
        return ok(request, delivery_document(row))
    removed = await services.fetchval(QUERIES["webhook_delivery_endpoint_removed"], delivery_id)
    if removed:
        raise ApiError(
            409,
            "endpoint_removed",
            f"delivery {delivery_id}'s endpoint was removed",
            param="delivery_id",
        )
    raise ApiError(404, "not_found", f"no webhook delivery {delivery_id}", param="delivery_id")
