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

import base64
import re
from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response
from pydantic import BeforeValidator

from workers.api.auth import API_KEY_HEADER, BEARER, require
from workers.api.envelope import ApiError, ok
from workers.api.ingest import charge_document
from workers.api.services import Services
from workers.db import QUERIES, Row

router = APIRouter(
    dependencies=[Depends(BEARER), Depends(API_KEY_HEADER), Depends(require("read"))]
)

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
MAX_USAGE_PERIODS = 1000  # periods of one usage history answer (days or months)
# Grant sources that are tokens bought (a top-up), as opposed to allocated or given.
TOP_UP_SOURCES = frozenset({"purchase", "auto_reload", "manual"})


# --- parameters -------------------------------------------------------------------------------


def _moment(value: object) -> object:
    """RFC 3339 with a time zone, or a date (midnight UTC), for a time query parameter."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    # A '+' left unencoded in a query string arrives as a space: 10:00:00 01:00.
    text = re.sub(r" (\d\d:\d\d)$", r"+\1", text)
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), time(), tzinfo=UTC)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError("expected RFC 3339 (2026-11-22T10:00:00Z) or a date") from None
    if moment.tzinfo is None:
        raise ValueError("needs a time zone, e.g. Z or +01:00")
    return moment


Moment = Annotated[datetime, BeforeValidator(_moment)]
Ref = Annotated[str, Path(min_length=1, max_length=200)]


def _filter(description: str) -> Any:
    return Query(min_length=1, max_length=200, description=description)


class Page:
    """``limit`` and ``cursor`` of a list request."""

    def __init__(self, limit: int, cursor: str | None) -> None:
        self.limit = limit
        self.cursor = cursor


def page_params(
    limit: Annotated[
        int, Query(ge=1, le=MAX_LIMIT, description="rows per page (1-100)")
    ] = DEFAULT_LIMIT,
    cursor: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=1000,
            description="the `meta.pagination.cursor` of the previous page",
        ),
    ] = None,
) -> Page:
    return Page(limit, cursor)


Paging = Annotated[Page, Depends(page_params)]


# --- cursors ----------------------------------------------------------------------------------

_CURSOR_TEXT = re.compile(r"^[A-Za-z0-9_-]+$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_BIGINT = 2**63


def encode_cursor(kind: str, *key: int | str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([kind, *key])).rstrip(b"=").decode()


def decode_cursor(cursor: str | None, kind: str, *shape: type) -> list[Any] | None:
    """The key a cursor of list ``kind`` holds (values of the types in ``shape``), None for
    no cursor; 422 ``invalid_cursor`` for anything this list did not give out."""
    if cursor is None:
        return None
    if not _CURSOR_TEXT.match(cursor):
        raise _bad_cursor()
    try:
        value = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except ValueError:  # binascii.Error and orjson.JSONDecodeError are ValueErrors
        raise _bad_cursor() from None
    if (
        not isinstance(value, list)
        or len(value) != 1 + len(shape)
        or value[0] != kind
        or not all(type(v) is t for v, t in zip(value[1:], shape, strict=True))
        or not all(-_BIGINT <= v < _BIGINT for v in value[1:] if isinstance(v, int))
        or not all(len(v) <= 200 for v in value[1:] if isinstance(v, str))
    ):
        raise _bad_cursor()
    return value[1:]


def _bad_cursor() -> ApiError:
    return ApiError(
        422, "invalid_cursor", "the cursor is not one this list gave out", param="cursor"
    )


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _from_micros(micros: int) -> datetime:
    try:
        return _EPOCH + timedelta(microseconds=micros)
    except OverflowError:
        raise _bad_cursor() from None


def _page(
    request: Request,
    rows: list[Row],
    page: Page,
    document: Callable[[Row], dict[str, Any]],
    cursor_of: Callable[[Row], str],
    *,
    wrap: Callable[[list[dict[str, Any]]], Any] = lambda items: items,
) -> Response:
    """One page of a list fetched with ``page.limit + 1`` rows, in the envelope."""
    has_more = len(rows) > page.limit
    shown = rows[: page.limit]
    cursor = cursor_of(shown[-1]) if has_more else None
    return ok(
        request,
        wrap([document(row) for row in shown]),
        pagination={"cursor": cursor, "has_more": has_more},
    )


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


# --- flows ------------------------------------------------------------------------------------


def _flow(row: Any) -> dict[str, Any]:
    flow = dict(row.items())
    if isinstance(flow.get("amounts"), str):
        flow["amounts"] = orjson.loads(flow["amounts"])
    return flow


@router.get("/v1/flows", summary="Flows with payee, status, last charge time and amounts")
async def list_flows(request: Request) -> Response:
    rows = await _services(request).fetch(QUERIES["flow_list"], None)
    return ok(request, [_flow(row) for row in rows])


@router.get("/v1/flows/{flow_id}", summary="One flow")
async def show_flow(request: Request, flow_id: str = Path(max_length=200)) -> Response:
    rows = await _services(request).fetch(QUERIES["flow_list"], flow_id)
    if not rows:
        raise ApiError(404, "unknown_flow", f"no flow {flow_id!r}", param="flow_id")
    return ok(request, _flow(rows[0]))


# --- charges ----------------------------------------------------------------------------------


def _charge_cursor(row: Row) -> str:
    return encode_cursor("charges", _micros(row["recorded_at"]), row["charge_id"])


def _charge_after(page: Page) -> tuple[datetime | None, int | None]:
    key = decode_cursor(page.cursor, "charges", int, int)
    return (None, None) if key is None else (_from_micros(key[0]), key[1])


@router.get("/v1/charges", summary="Charges, newest recorded first")
async def list_charges(
    request: Request,
    page: Paging,
    flow_id: Annotated[str | None, _filter("only this flow's charges")] = None,
    customer_ref: Annotated[str | None, _filter("only this customer's charges")] = None,
    status: Annotated[Literal["recorded", "paid_out"] | None, Query()] = None,
    since: Annotated[Moment | None, Query(description="recorded at or after")] = None,
    until: Annotated[Moment | None, Query(description="recorded before")] = None,
) -> Response:
    after, after_id = _charge_after(page)
    rows = await _services(request).fetch(
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
    return _page(request, rows, page, charge_document, _charge_cursor)


@router.get("/v1/charges/{charge_id}", summary="One charge")
async def show_charge(request: Request, charge_id: int = Path(ge=1, le=2**63 - 1)) -> Response:
    row = await _services(request).fetchrow(QUERIES["api_charge"], charge_id)
    if row is None:
        raise ApiError(404, "not_found", f"no charge {charge_id}", param="charge_id")
    return ok(request, charge_document(row))


# --- a customer's credits, ledger and usage ---------------------------------------------------

_GRANT_FIELDS = (
    "reference",
    "tokens",
    "remaining",
    "expires_at",
    "source",
    "effective_at",
    "priority",
    "cost_basis",
    "currency",
    "status",
    "description",
)


@router.get(
    "/v1/customers/{customer_ref}/credits",
    summary="A customer's balance, auto-reload settings and grants",
)
async def show_credits(request: Request, customer_ref: Ref) -> Response:
    """A customer with no event yet reads as balance 0 with no grants."""
    rows = await _services(request).fetch(QUERIES["api_credits"], customer_ref)
    first = rows[0]  # the statement always returns a row
    grants = [{f: row[f] for f in _GRANT_FIELDS} for row in rows if row["reference"] is not None]
    topped_up = [
        g["effective_at"]
        for g in grants
        if g["source"] in TOP_UP_SOURCES and g["status"] not in ("pending", "voided")
    ]
    return ok(
        request,
        {
            "customer_ref": customer_ref,
            "balance": first["balance"] or 0,
            "auto_reload": {
                "enabled": first["auto_reload_enabled"],
                "threshold": first["reload_threshold"],
                "tokens": first["reload_tokens"],
                "price": first["reload_price"],
                "currency": first["reload_currency"],
            },
            "low_balance_threshold": first["low_balance_threshold"],
            "last_topped_up_at": max(topped_up, default=None),
            "payment_method": None,  # not stored yet (SPEC section 13)
            "grants": grants,
        },
    )


@router.get(
    "/v1/customers/{customer_ref}/ledger",
    summary="A customer's ledger entries, newest first",
)
async def list_ledger(request: Request, customer_ref: Ref, page: Paging) -> Response:
    """Each entry: ``seq, kind, amount, balance_after, grant_reference`` (the grant whose
    tokens it moved, if any), ``cause_reference`` (the event that caused it), ``created_at``.
    """
    key = decode_cursor(page.cursor, "ledger", int)
    rows = await _services(request).fetch(
        QUERIES["api_ledger_page"], customer_ref, None if key is None else key[0], page.limit + 1
    )
    return _page(
        request,
        rows,
        page,
        lambda row: dict(row.items()),
        lambda row: encode_cursor("ledger", row["seq"]),
    )


def _month_start(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _next_month(day: date) -> date:
    return date(day.year + day.month // 12, day.month % 12 + 1, 1)


def _features(rows: list[Row]) -> list[dict[str, Any]]:
    """Tokens and events per feature (None: usage sent without one), by feature name."""
    totals: dict[str | None, dict[str, Any]] = {}
    for row in rows:
        total = totals.setdefault(
            row["feature"], {"feature": row["feature"], "tokens": 0, "events": 0}
        )
        total["tokens"] += row["tokens"]
        total["events"] += row["events"]
    return sorted(totals.values(), key=lambda t: (t["feature"] is None, t["feature"] or ""))


@router.get(
    "/v1/customers/{customer_ref}/usage",
    summary="Tokens a customer used in the current period, per feature",
)
async def show_usage(
    request: Request,
    customer_ref: Ref,
    start: Annotated[
        Moment | None, Query(description="occurred at or after (default: this month, UTC)")
    ] = None,
    end: Annotated[
        Moment | None, Query(description="occurred before (default: next month, UTC)")
    ] = None,
) -> Response:
    """By when the usage occurred; the period is the current calendar month (UTC) unless
    ``start``/``end`` are given. A customer with no usage reads as zero."""
    this_month = _month_start(datetime.now(UTC))
    start = start or this_month
    end = end or datetime.combine(_next_month(this_month.date()), time(), tzinfo=UTC)
    if start >= end:
        raise ApiError(422, "invalid_request", "end: must be after start", param="end")
    rows = await _services(request).fetch(
        QUERIES["usage_report"], customer_ref, start, end, "month", None
    )
    features = _features(rows)
    return ok(
        request,
        {
            "customer_ref": customer_ref,
            "start": start,
            "end": end,
            "tokens": sum(f["tokens"] for f in features),
            "events": sum(f["events"] for f in features),
            "features": features,
        },
    )


def _periods(start: date, end: date, granularity: str) -> list[date]:
    """The first day of every day or month from ``start`` to ``end`` (inclusive)."""
    periods: list[date] = []
    current = start if granularity == "day" else start.replace(day=1)
    while current <= end and len(periods) <= MAX_USAGE_PERIODS:
        periods.append(current)
        try:
            current = current + timedelta(days=1) if granularity == "day" else _next_month(current)
        except (OverflowError, ValueError):  # past year 9999
            break
    return periods


@router.get(
    "/v1/customers/{customer_ref}/usage/history",
    summary="Tokens a customer used per day or month and feature",
)
async def usage_history(
    request: Request,
    customer_ref: Ref,
    start_date: Annotated[date, Query(description="first day (UTC), inclusive")],
    end_date: Annotated[date, Query(description="last day (UTC), inclusive")],
    granularity: Annotated[Literal["day", "month"], Query()] = "day",
) -> Response:
    """Every period of the range, those without usage at zero; a month counts only the
    days of the range it holds."""
    if end_date < start_date:
        raise ApiError(
            422, "invalid_request", "end_date: must not be before start_date", param="end_date"
        )
    periods = _periods(start_date, end_date, granularity)
    if len(periods) > MAX_USAGE_PERIODS or end_date == date.max:
        raise ApiError(
            422,
            "invalid_request",
            f"end_date: at most {MAX_USAGE_PERIODS} {granularity}s in one answer",
            param="end_date",
        )
    rows = await _services(request).fetch(
        QUERIES["usage_report"],
        customer_ref,
        datetime.combine(start_date, time(), tzinfo=UTC),
        datetime.combine(end_date + timedelta(days=1), time(), tzinfo=UTC),
        granularity,
        None,
    )
    by_period: dict[date, list[Row]] = {}
    for row in rows:
        by_period.setdefault(row["period_start"].astimezone(UTC).date(), []).append(row)
    answer = []
    for period in periods:
        features = _features(by_period.get(period, []))
        answer.append(
            {
                "period_start": period,
                "tokens": sum(f["tokens"] for f in features),
                "events": sum(f["events"] for f in features),
                "features": features,
            }
        )
    return ok(
        request,
        {
            "customer_ref": customer_ref,
            "granularity": granularity,
            "start_date": start_date,
            "end_date": end_date,
            "tokens": sum(p["tokens"] for p in answer),
            "periods": answer,
        },
    )


# --- payouts ----------------------------------------------------------------------------------


def _payout_cursor(row: Row) -> str:
    return encode_cursor("payouts", _micros(row["period_end"]), row["payee_ref"], row["currency"])


@router.get("/v1/payouts", summary="Payouts, newest period first")
async def list_payouts(
    request: Request,
    page: Paging,
    payee_ref: Annotated[str | None, _filter("only this payee's payouts")] = None,
    currency: Annotated[str | None, Query(pattern="^[A-Za-z]{3}$")] = None,
    status: Annotated[Literal["recorded", "pending", "sent", "failed"] | None, Query()] = None,
) -> Response:
    key = decode_cursor(page.cursor, "payouts", int, str, str)
    after, payee, after_currency = (None, None, None) if key is None else key
    rows = await _services(request).fetch(
        QUERIES["api_payout_page"],
        payee_ref,
        None if currency is None else currency.upper(),
        status,
        None if after is None else _from_micros(after),
        payee,
        after_currency,
        page.limit + 1,
    )
    return _page(request, rows, page, lambda row: dict(row.items()), _payout_cursor)


@router.get("/v1/payouts/{payout_id}", summary="One payout with its charges (paginated)")
async def show_payout(
    request: Request,
    page: Paging,
    payout_id: Annotated[str, Path(min_length=1, max_length=200)],
) -> Response:
    """The payout, and one page of its charges, newest first (``meta.pagination``)."""
    services = _services(request)
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
    return _page(
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
    reason: Annotated[str | None, _filter("only this reason, e.g. unknown_flow")] = None,
    since: Annotated[Moment | None, Query(description="recorded at or after")] = None,
) -> Response:
    key = decode_cursor(page.cursor, "dead_letters", int)
    rows = await _services(request).fetch(
        QUERIES["api_dead_letter_page"],
        reason,
        since,
        None if key is None else key[0],
        page.limit + 1,
    )
    return _page(
        request,
        rows,
        page,
        lambda row: dict(row.items()),
        lambda row: encode_cursor("dead_letters", row["id"]),
    )
