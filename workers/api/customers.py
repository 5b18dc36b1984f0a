"""A customer's credits, ledger and usage (scope read). A customer with no event yet reads
as zero: balance 0, no grants, no entries, no usage."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any, Literal

from fastapi import Query, Request
from fastapi.responses import Response

from workers.api.auth import scoped_router
from workers.api.envelope import ApiError, ok
from workers.api.paging import (
    Moment,
    Paging,
    Ref,
    decode_cursor,
    encode_cursor,
    page_of,
    services_of,
)
from workers.db import QUERIES, Row

MAX_USAGE_PERIODS = 1000  # periods of one usage history answer (days or months)
TOP_UP_SOURCES = frozenset({"purchase", "auto_reload", "manual"})

router = scoped_router("read")

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
    "/v1/customers/{customer_ref:id}/credits",
    summary="A customer's balance, auto-reload settings and grants",
)
async def show_credits(request: Request, customer_ref: Ref) -> Response:
    """A customer with no event yet reads as balance 0 with no grants."""
    rows = await services_of(request).fetch(QUERIES["api_credits"], customer_ref)
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
            "payment_method": (
                None
                if first["payment_method_type"] is None
                else {
                    "type": first["payment_method_type"],
                    "brand": first["payment_method_brand"],
                    "last4": first["payment_method_last4"],
                }
            ),
            "grants": grants,
        },
    )


@router.get(
    "/v1/customers/{customer_ref:id}/ledger",
    summary="A customer's ledger entries, newest first",
)
async def list_ledger(request: Request, customer_ref: Ref, page: Paging) -> Response:
    """Each entry: ``seq, kind, amount, balance_after, grant_reference`` (the grant whose
    tokens it moved, if any), ``cause_reference`` (the event that caused it), ``created_at``.
    """
    key = decode_cursor(page.cursor, "ledger", int)
    rows = await services_of(request).fetch(
        QUERIES["api_ledger_page"], customer_ref, None if key is None else key[0], page.limit + 1
    )
    return page_of(
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
    "/v1/customers/{customer_ref:id}/usage",
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
    rows = await services_of(request).fetch(
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
    "/v1/customers/{customer_ref:id}/usage/history",
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
    if end_date == date.max:  # the range's end, the day after, is no date
        raise ApiError(
            422, "invalid_request", "end_date: must be before 9999-12-31", param="end_date"
        )
    periods = _periods(start_date, end_date, granularity)
    if len(periods) > MAX_USAGE_PERIODS:
        raise ApiError(
            422,
            "invalid_request",
            f"end_date: at most {MAX_USAGE_PERIODS} {granularity}s in one answer",
            param="end_date",
        )
    rows = await services_of(request).fetch(
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
