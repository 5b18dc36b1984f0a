"""Ingestion: events onto the input topics, never into Postgres.

``POST /v1/flows/{flow_id}/charges`` records one charge (Orvion's call);
``POST /v1/events`` takes up to 1,000 events of any type, as a JSON array or NDJSON. Every
event is validated by the models the workers use, published keyed by ``customer_ref`` with
acks from all in-sync replicas, and answered only once the broker has it.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from fastapi import Path, Request
from fastapi.responses import Response

from schemas.events import ChargeEvent, EventRejected, InputEvent, fingerprint, parse_event
from workers.api.auth import scoped_router
from workers.api.bodies import dump_json, json_object, parse_json, read_body
from workers.api.envelope import ApiError, ok
from workers.api.services import Services

router = scoped_router("ingest")
MAX_BATCH_EVENTS = 1000
MAX_WAIT_S = 30
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d+)", re.IGNORECASE)


def _charge_body_schema() -> dict[str, Any]:
    schema = copy.deepcopy(ChargeEvent.model_json_schema())
    for field in ("type", "flow_id"):
        schema["properties"].pop(field)
        schema["required"].remove(field)
    schema["title"] = "ChargeRequest"
    schema["description"] = "A charge through the flow named in the path."
    return schema


def _body(schema: dict[str, Any], *media: str) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {m: {"schema": schema} for m in media}}}


@router.post(
    "/v1/flows/{flow_id:id}/charges",
    status_code=202,
    summary="Record a charge",
    openapi_extra={
        **_body(_charge_body_schema(), "application/json"),
        "parameters": [
            {
                "name": "Prefer",
                "in": "header",
                "required": False,
                "description": f"wait=N: wait up to N <= {MAX_WAIT_S} s for the worker's "
                "verdict (201, 200 or 409) before a 202.",
                "schema": {"type": "string", "examples": ["wait=5"]},
            }
        ],
    },
    responses={
        201: {"description": "Recorded (with Prefer: wait)"},
        200: {"description": "A duplicate: the charge first recorded (with Prefer: wait)"},
        409: {"description": "flow_paused or reference_conflict"},
        404: {"description": "unknown_flow"},
    },
)
async def record_charge(
    request: Request,
    flow_id: str = Path(min_length=1, max_length=200),
) -> Response:
    services: Services = request.app.state.services
    raw = await read_body(request, services.settings.max_event_bytes)
    body = json_object(raw, not_an_object="invalid_event")
    for field in ("type", "flow_id"):
        if field in body:
            raise ApiError(
                422, "invalid_event", f"{field}: Extra inputs are not permitted", param=field
            )
    value = dump_json({"type": "charge", "flow_id": flow_id, **body})
    event = _validated(value)
    assert isinstance(event, ChargeEvent)
    await _check_flow(services, flow_id)
    meta = await services.publish(
        services.settings.topic_charges, event.customer_ref.encode(), value
    )
    accepted = {"flow_id": flow_id, "reference": event.reference, "status": "accepted"}
    wait = _prefer_wait(request)
    if wait is None:
        return ok(request, accepted, 202)
    verdict = await services.waiter.wait(
        flow_id, event.reference, meta.partition, meta.offset, float(wait)
    )
    if verdict is None:
        return ok(request, accepted, 202)
    return await _answer(
        request, services, event, verdict, (meta.topic, meta.partition, meta.offset)
    )


async def _answer(
    request: Request,
    services: Services,
    event: ChargeEvent,
    verdict: dict[str, Any],
    position: tuple[str, int, int],
) -> Response:
    reason = verdict.get("dead_letter")
    if reason == "unknown_flow":
        raise ApiError(404, "unknown_flow", f"no flow {event.flow_id!r}", param="flow_id")
    if reason is not None:
        status = 409 if reason in ("flow_paused", "reference_conflict") else 422
        raise ApiError(status, str(reason), f"the charge was not recorded: {reason}")
    charge = verdict["charge"]
    if verdict["position"] == position:
        return ok(request, charge, 201)
    if verdict["fingerprint"] == fingerprint(event):
        return ok(request, {**charge, "duplicate": True}, 200)
    raise ApiError(
        409,
        "reference_conflict",
        f"reference {event.reference!r} was first recorded with another payload",
        param="reference",
    )


@router.post(
    "/v1/events",
    status_code=202,
    summary="Send a batch of events",
    openapi_extra=_body(
        {"type": "array", "maxItems": MAX_BATCH_EVENTS, "items": {"type": "object"}},
        "application/json",
        "application/x-ndjson",
    ),
)
async def send_events(request: Request) -> Response:
    services: Services = request.app.state.services
    raw = await read_body(request, services.settings.api_max_batch_bytes)
    items = _batch_items(raw, request.headers.get("content-type", ""))
    results: list[dict[str, Any]] = []
    records: list[tuple[str, bytes, bytes]] = []
    for index, item in enumerate(items):
        try:
            event = _validated(item)
            if isinstance(event, ChargeEvent):
                await _check_flow(services, event.flow_id)
        except ApiError as exc:
            error = {"code": exc.code, "message": exc.message}
            if exc.param is not None:
                error["param"] = exc.param
            results.append({"index": index, "status": "invalid", "error": error})
            continue
        topic = (
            services.settings.topic_charges
            if isinstance(event, ChargeEvent)
            else services.settings.topic_usage
        )
        records.append((topic, event.customer_ref.encode(), item))
        results.append({"index": index, "status": "accepted"})
    await services.publish_many(records)
    accepted = sum(1 for r in results if r["status"] == "accepted")
    return ok(request, results, 202, accepted=accepted, invalid=len(results) - accepted)


# --- helpers ----------------------------------------------------------------------------------


def _validated(value: bytes) -> InputEvent:
    try:
        return parse_event(value)
    except EventRejected as exc:
        if exc.reason == "invalid_json":  # no field to name: the bytes are not JSON
            raise ApiError(400, exc.reason, exc.detail) from None
        param = exc.detail.split(":", 1)[0] if ":" in exc.detail else None
        raise ApiError(422, exc.reason, exc.detail, param=param) from None


def _batch_items(raw: bytes, content_type: str) -> list[bytes]:
    if "ndjson" in content_type:
        items = [line for line in raw.split(b"\n") if line.strip()]
    else:
        parsed = parse_json(raw)
        if not isinstance(parsed, list):
            raise ApiError(422, "invalid_request", "the body should be a JSON array of events")
        items = [dump_json(item) for item in parsed]
    if not items:
        raise ApiError(422, "invalid_request", "the batch holds no event")
    if len(items) > MAX_BATCH_EVENTS:
        raise ApiError(413, "too_many_events", f"a batch holds at most {MAX_BATCH_EVENTS} events")
    return items


async def _check_flow(services: Services, flow_id: str) -> None:
    status = await services.flow_status(flow_id)
    if status is None:
        raise ApiError(404, "unknown_flow", f"no flow {flow_id!r}", param="flow_id")
    if status != "active":
        raise ApiError(409, "flow_paused", f"flow {flow_id!r} is paused", param="flow_id")


def _prefer_wait(request: Request) -> int | None:
    match = _PREFER_WAIT.search(request.headers.get("prefer", ""))
    if match is None:
        return None
    return min(int(match.group(1)), MAX_WAIT_S)
