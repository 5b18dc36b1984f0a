"""Reads from Postgres: flows and charges. Every GET needs the ``read`` scope."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response

from workers.api.auth import API_KEY_HEADER, BEARER, require
from workers.api.envelope import ApiError, ok
from workers.api.ingest import charge_document
from workers.api.services import Services
from workers.db import QUERIES

router = APIRouter(
    dependencies=[Depends(BEARER), Depends(API_KEY_HEADER), Depends(require("read"))]
)


def _flow(row: Any) -> dict[str, Any]:
    flow = dict(row.items())
    if isinstance(flow.get("amounts"), str):
        flow["amounts"] = orjson.loads(flow["amounts"])
    return flow


@router.get("/v1/flows", summary="Flows with payee, status, last charge time and amounts")
async def list_flows(request: Request) -> Response:
    services: Services = request.app.state.services
    rows = await services.fetch(QUERIES["flow_list"], None)
    return ok(request, [_flow(row) for row in rows])


@router.get("/v1/flows/{flow_id}", summary="One flow")
async def show_flow(request: Request, flow_id: str = Path(max_length=200)) -> Response:
    services: Services = request.app.state.services
    rows = await services.fetch(QUERIES["flow_list"], flow_id)
    if not rows:
        raise ApiError(404, "unknown_flow", f"no flow {flow_id!r}", param="flow_id")
    return ok(request, _flow(rows[0]))


@router.get("/v1/charges/{charge_id}", summary="One charge")
async def show_charge(request: Request, charge_id: int = Path(ge=1, le=2**63 - 1)) -> Response:
    services: Services = request.app.state.services
    row = await services.fetchrow(QUERIES["api_charge"], charge_id)
    if row is None:
        raise ApiError(404, "not_found", f"no charge {charge_id}", param="charge_id")
    return ok(request, charge_document(row))
