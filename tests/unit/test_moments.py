"""Range bounds from the command line and the API's query strings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.moments import range_bound


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-12-08T01:50:47.309530Z", datetime(2026, 12, 8, 1, 50, 47, 309530, UTC)),
        ("2026-12-08T01:50:47.3095300Z", datetime(2026, 12, 8, 1, 50, 47, 309530, UTC)),
        ("2026-12-08T01:50:47.309530001Z", datetime(2026, 12, 8, 1, 50, 47, 309531, UTC)),
        ("2026-12-08T01:50:47.999999999Z", datetime(2026, 12, 8, 1, 50, 48, tzinfo=UTC)),
        ("2026-12-08T02:50:47+01:00", datetime(2026, 12, 8, 1, 50, 47, tzinfo=UTC)),
        ("2026-12-08", datetime(2026, 12, 8, tzinfo=UTC)),
    ],
)
def test_a_bound_is_read_in_utc_a_finer_fraction_rounded_up(text: str, expected: datetime) -> None:
    bound = range_bound(text)
    assert bound == expected
    assert bound.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "text",
    [
        "yesterday",
        "2026-12-08T01:50:47",  # no time zone
        "2026-02-30",
        "9999-12-31T23:59:59.9999999Z",  # rounds up past the last instant
        "0001-01-01T00:00:00+01:00",  # before the first instant in UTC
    ],
)
def test_what_is_not_a_bound_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError, match=r"expected RFC 3339|time zone|out of range"):
        range_bound(text)


@given(
    st.datetimes(
        min_value=datetime(2000, 1, 1),
        max_value=datetime(2100, 1, 1),
        timezones=st.just(UTC),
    ),
    st.integers(min_value=0, max_value=999),
)
def test_a_stored_time_is_within_a_bound_exactly_when_it_is_within_the_nanoseconds(
    stored: datetime, nanoseconds: int
) -> None:
    """x >= bound and x < bound agree with the bound as written, to the nanosecond, for
    every time stored to the microsecond."""
    written = stored.replace(tzinfo=None).isoformat(timespec="microseconds") + f"{nanoseconds:03d}Z"
    bound = range_bound(written)
    exact_ns = (stored - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000
    for candidate in (
        stored - timedelta(microseconds=1),
        stored,
        stored + timedelta(microseconds=1),
    ):
        candidate_ns = (
            (candidate - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000
        )
        assert (candidate >= bound) == (candidate_ns >= exact_ns + nanoseconds)
        assert (candidate < bound) == (candidate_ns < exact_ns + nanoseconds)
