"""Flows administration (scope admin), as ``chargeline flows create|pause|resume``: the same
statements (workers/sql/flows.sql), the same rules for ids (1-200 printable characters).

``POST /v1/flows`` answers 201 with the flow, 409 ``flow_exists`` when there is one;
``POST /v1/flows/{flow_id}/pause`` and ``.../resume`` answer 200 with the flow, 404
``unknown_flow``. Pausing a paused flow (or resuming an active one) changes nothing and
answers 200. Also here: the body and identifier checks the billing routes share.
"""

from __future__ import annotations

from typing import Literal

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from schemas.common import Identifier
from workers.api.auth import scoped_router
from workers.api.bodies import json_body, parse_body
from workers.api.documents import flow_document
from workers.api.envelope import ApiError, ok
from workers.api.paging import Ref
from workers.api.services import Services
from workers.db import QUERIES

router = scoped_router("admin")


class FlowCreate(BaseModel):
    """A new flow; its charges are paid out to ``payee_ref``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, title="FlowCreate")

    flow_id: Identifier
    name: Identifier = Field(description="The flow's name: 1-200 printable characters.")
    payee_ref: Identifier = Field(
        default="default", description="The payee paid for its charges (default `default`)."
    )


# --- shared with the billing routes ---------------------------------------------------------


# --- flows ------------------------------------------------------------------------------------


async def _flow_answer(request: Request, services: Services, flow_id: str, status: int) -> Response:
    services.flows.pop(flow_id, None)  # this process sees the change at once
    rows = await services.fetch(QUERIES["flow_list"], flow_id)
    if not rows:  # gone in between: nothing deletes flows today
        raise ApiError(404, "unknown_flow", f"no flow {flow_id!r}", param="flow_id")
    return ok(request, flow_document(rows[0]), status)


@router.post(
    "/v1/flows",
    status_code=201,
    summary="Create a flow",
    openapi_extra=json_body(FlowCreate),
    responses={201: {"description": "The flow"}, 409: {"description": "flow_exists"}},
)
async def create_flow(request: Request) -> Response:
    services: Services = request.app.state.services
    body = await parse_body(request, FlowCreate)
    created = await services.fetchval(
        QUERIES["flow_create"], body.flow_id, body.name, body.payee_ref
    )
    if created is None:
        raise ApiError(409, "flow_exists", f"flow {body.flow_id!r} already exists", param="flow_id")
    return await _flow_answer(request, services, body.flow_id, 201)


async def _set_status(
    request: Request, flow_id: str, status: Literal["active", "paused"]
) -> Response:
    services: Services = request.app.state.services
    if await services.fetchval(QUERIES["flow_set_status"], flow_id, status) is None:
        raise ApiError(404, "unknown_flow", f"no flow {flow_id!r}", param="flow_id")
    return await _flow_answer(request, services, flow_id, 200)


@router.post(
    "/v1/flows/{flow_id:id}/pause",
    summary="Pause a flow: its charges are refused (flow_paused) until it is resumed",
    responses={404: {"description": "unknown_flow"}},
)
async def pause_flow(request: Request, flow_id: Ref) -> Response:
    return await _set_status(request, flow_id, "paused")


@router.post(
    "/v1/flows/{flow_id:id}/resume",
    summary="Resume a paused flow",
    responses={404: {"description": "unknown_flow"}},
)
async def resume_flow(request: Request, flow_id: Ref) -> Response:
    return await _set_status(request, flow_id, "active")
