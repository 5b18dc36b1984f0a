"""Parameters shared by the read routes: moments, references, pages, and the opaque cursors
of keyset pagination (the list's name and the last row's sort key, base64url)."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import orjson
from fastapi import Depends, Path, Query, Request
from fastapi.responses import Response
from pydantic import AfterValidator, BeforeValidator
from pydantic_core import PydanticCustomError

from schemas.common import MAX_IDENTIFIER_LENGTH
from schemas.printable import is_printable
from workers.api.envelope import ApiError, ok
from workers.api.services import Services
from workers.db import Row
from workers.moments import range_bound

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
# Grant sources that are tokens bought (a top-up), as opposed to allocated or given.


# --- parameters -------------------------------------------------------------------------------


def _moment(value: object) -> object:
    """RFC 3339 with a time zone, or a date (midnight UTC), for a time query parameter."""
    if not isinstance(value, str):
        return value
    # A '+' left unencoded in a query string arrives as a space: 10:00:00 01:00.
    return range_bound(re.sub(r" (\d\d:\d\d)$", r"+\1", value.strip()))


Moment = Annotated[datetime, BeforeValidator(_moment)]


def _printable(value: str) -> str:
    if not is_printable(value):
        raise PydanticCustomError("printable", "expected 1-200 printable characters")
    return value


# An id in a path (a customer's reference, a flow's id): 1-200 printable characters, as an
# event's are (no object can have another), so a read refuses it as a write does.
Ref = Annotated[
    str, Path(min_length=1, max_length=MAX_IDENTIFIER_LENGTH), AfterValidator(_printable)
]


def filter_param(description: str) -> Any:
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
        raise bad_cursor()
    try:
        value = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except ValueError:  # binascii.Error and orjson.JSONDecodeError are ValueErrors
        raise bad_cursor() from None
    if (
        not isinstance(value, list)
        or len(value) != 1 + len(shape)
        or value[0] != kind
        or not all(type(v) is t for v, t in zip(value[1:], shape, strict=True))
        or not all(-_BIGINT <= v < _BIGINT for v in value[1:] if isinstance(v, int))
        or not all(len(v) <= 200 for v in value[1:] if isinstance(v, str))
    ):
        raise bad_cursor()
    return value[1:]


def bad_cursor() -> ApiError:
    return ApiError(
        422, "invalid_cursor", "the cursor is not one this list gave out", param="cursor"
    )


def micros(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


def from_micros(micros: int) -> datetime:
    try:
        return _EPOCH + timedelta(microseconds=micros)
    except OverflowError:
        raise bad_cursor() from None


def page_of(
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


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services
