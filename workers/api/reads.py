"""Reads from Postgres: flows, charges, a customer's credits, ledger and usage, payouts and
dead letters. Every GET needs the ``read`` scope.

Lists answer in pages, newest first: ``limit`` (1-100, default 20) and ``cursor``, with
``meta.pagination = {"cursor", "has_more"}``. A cursor is opaque to clients: base64url (no
padding) of a small JSON array naming its list and the sort key of the last row shown, so
the next page is the rows strictly after that key (keyset paging, never OFFSET). A walk
therefore sees every row that existed when it began exactly once, however many rows arrive
meanwhile; rows that arrive during the walk sort before its position and are not shown
(rows committed late with an older key may or may not be). ``cursor`` is null on the last
page. The filters are not in the cursor: send the same ones with every page.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import Path, Query, Request
from fastapi.responses import Response

from workers.api.auth import scoped_router
from workers.api.documents import charge_document, flow_document
from workers.api.envelope import ApiError, ok
from workers.api.paging import (
    Moment,
    Page,
    Paging,
    decode_cursor,
    encode_cursor,
    filter_param,
    from_micros,
    micros,
    page_of,
    services_of,
)
from workers.db import QUERIES, Row

router = scoped_router("read")

# --- flows ------------------------------------------------------------------------------------


def _flow_cursor(row: Row) -> str:
    return encode_cursor("flows", micros(row["created_at"]), row["flow_id"])


@router.get(
    "/v1/flows", summary="Flows with payee, status, last charge time and amounts, newest first"
)
async def list_flows(request: Request, page: Paging) -> Response:
    key = decode_cursor(page.cursor, "flows", int, str)
    after, after_flow = (None, None) if key is None else (from_micros(key[0]), key[1])
    rows = await services_of(request).fetch(
        QUERIES["api_flow_page"], after, after_flow, page.limit + 1
    )
    return page_of(request, rows, page, flow_document, _flow_cursor)


@router.get("/v1/flows/{flow_id:id}", summary="One flow")
async def show_flow(request: Request, flow_id: str = Path(max_length=200)) -> Response:
    rows = await services_of(request).fetch(QUERIES["flow_list"], flow_id)
    if not rows:
        raise ApiError(404, "unknown_flow", f"no flow {flow_id!r}", param="flow_id")
    return ok(request, flow_document(rows[0]))


# --- charges ----------------------------------------------------------------------------------


def _charge_cursor(row: Row) -> str:
    return encode_cursor("charges", micros(row["recorded_at"]), row["charge_id"])


def _charge_after(page: Page) -> tuple[datetime | None, int | None]:
    key = decode_cursor(page.cursor, "charges", int, int)
    return (None, None) if key is None else (from_micros(key[0]), key[1])


@router.get("/v1/charges", summary="Charges, newest recorded first")
async def list_charges(
    request: Request,
    page: Paging,
    flow_id: Annotated[str | None, filter_param("only this flow's charges")] = None,
    customer_ref: Annotated[str | None, filter_param("only this customer's charges")] = None,
    status: Annotated[Literal["recorded", "paid_out"] | None, Query()] = None,
    since: Annotated[Moment | None, Query(description="recorded at or after")] = None,
    until: Annotated[Moment | None, Query(description="recorded before")] = None,
) -> Response:
    after, after_id = _charge_after(page)
    rows = await services_of(request).fetch(
        QUERIES["api_charge_page"],
        flow_id,
        customer_ref,
        status,
        since,
        until,
        None,
        after,
        after_id,
        page.limit + 1,
    )
    return page_of(request, rows, page, charge_document, _charge_cursor)


@router.get("/v1/charges/{charge_id:id}", summary="One charge")
async def show_charge(request: Request, charge_id: int = Path(ge=1, le=2**63 - 1)) -> Response:
    row = await services_of(request).fetchrow(QUERIES["api_charge"], charge_id)
    if row is None:
        raise ApiError(404, "not_found", f"no charge {charge_id}", param="charge_id")
    return ok(request, charge_document(row))


# --- payouts ----------------------------------------------------------------------------------


def _payout_cursor(row: Row) -> str:
    return encode_cursor("payouts", micros(row["period_end"]), row["payee_ref"], row["currency"])


@router.get("/v1/payouts", summary="Payouts, newest period first")
async def list_payouts(
    request: Request,
    page: Paging,
    payee_ref: Annotated[str | None, filter_param("only this payee's payouts")] = None,
    currency: Annotated[str | None, Query(pattern="^[A-Za-z]{3}$")] = None,
    status: Annotated[
        Literal["recorded", "pending", "sent", "failed", "cancelled"] | None, Query()
    ] = None,
) -> Response:
    key = decode_cursor(page.cursor, "payouts", int, str, str)
    after, payee, after_currency = (None, None, None) if key is None else key
    rows = await services_of(request).fetch(
        QUERIES["api_payout_page"],
        payee_ref,
        None if currency is None else currency.upper(),
        status,
        None if after is None else from_micros(after),
        payee,
        after_currency,
        page.limit + 1,
    )
    return page_of(request, rows, page, lambda row: dict(row.items()), _payout_cursor)


@router.get("/v1/payouts/{payout_id:id}", summary="One payout with its charges (paginated)")
async def show_payout(
    request: Request,
    page: Paging,
    payout_id: Annotated[str, Path(min_length=1, max_length=200)],
) -> Response:
    """The payout, and one page of its charges, newest first (``meta.pagination``)."""
    services = services_of(request)
    payout = await services.fetchrow(QUERIES["payout_show"], payout_id)
    if payout is None:
        raise ApiError(404, "not_found", f"no payout {payout_id!r}", param="payout_id")
    after, after_id = _charge_after(page)
    rows = await services.fetch(
        QUERIES["api_charge_page"],
        None,
        None,
        None,
        None,
        None,
        payout_id,
        after,
        after_id,
        page.limit + 1,
    )
    return page_of(
        request,
        rows,
        page,
        charge_document,
        _charge_cursor,
        wrap=lambda charges: {**dict(payout.items()), "charges": charges},
    )


# --- dead letters -----------------------------------------------------------------------------


@router.get("/v1/dead-letters", summary="Dead letters, newest first")
async def list_dead_letters(
    request: Request,
    page: Paging,
    reason: Annotated[str | None, filter_param("only this reason, e.g. unknown_flow")] = None,
    since: Annotated[Moment | None, Query(description="recorded at or after")] = None,
) -> Response:
    key = decode_cursor(page.cursor, "dead_letters", int)
    rows = await services_of(request).fetch(
        QUERIES["api_dead_letter_page"],
        reason,
        since,
        None if key is None else key[0],
        page.limit + 1,
    )
    return page_of(
        request,
        rows,
        page,
        lambda row: dict(row.items()),
        lambda row: encode_cursor("dead_letters", row["id"]),
    )
