"""Times given as the bounds of a range, on the command line and in the API's query
strings: ``--since``/``--until``, ``since``/``until``/``start``/``end``."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta

# The digits of a fraction of a second beyond the sixth: datetime drops them.
_SUB_MICROSECOND = re.compile(r"\.[0-9]{6}([0-9]+)")


def range_bound(text: str) -> datetime:
    """RFC 3339 with a time zone, or a date (its midnight in UTC); ValueError otherwise.

    Ranges are half open, [since, until), over times stored to the microsecond, so a
    bound with a finer fraction is rounded up, not cut: x >= 10:00:00.0000001 holds exactly
    when x >= 10:00:00.000001 does, and so does x < for either bound.
    """
    try:
        if len(text) == len("2026-11-22"):
            return datetime.combine(date.fromisoformat(text), time(), tzinfo=UTC)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError("expected RFC 3339 (2026-11-22T10:00:00Z) or a date") from None
    if moment.tzinfo is None:
        raise ValueError("needs a time zone, e.g. Z or +01:00")
    finer = _SUB_MICROSECOND.search(text)
    try:
        if finer is not None and finer.group(1).strip("0"):
            moment += timedelta(microseconds=1)
        return moment.astimezone(UTC)  # in range once in UTC, as Postgres will compare it
    except OverflowError:
        raise ValueError("out of range: years 1-9999 in UTC") from None
