"""Payout periods: UTC boundaries, grace delay, which period the worker closes next."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from workers.cli.main import build_parser
from workers.errors import UsageError
from workers.jobs.payouts import PayoutPeriod, next_scheduled_cut, period_floor, period_length

CET = timezone(timedelta(hours=1))


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.mark.parametrize(
    ("moment", "period", "start"),
    [
        ("2026-11-22T10:59:59.999999Z", "hourly", "2026-11-22T10:00:00Z"),
        ("2026-11-22T11:00:00Z", "hourly", "2026-11-22T11:00:00Z"),
        ("2026-11-22T23:30:00Z", "daily", "2026-11-22T00:00:00Z"),
        ("2026-11-23T00:00:00Z", "daily", "2026-11-23T00:00:00Z"),
        # Local times are read in UTC: 00:30 in CET is 23:30 UTC the day before.
        ("2026-11-23T00:30:00+01:00", "daily", "2026-11-22T00:00:00Z"),
        ("2026-11-23T00:30:00+01:00", "hourly", "2026-11-22T23:00:00Z"),
        # A half-hour zone: hours still start on the UTC hour.
        ("2026-11-22T10:15:00+05:30", "hourly", "2026-11-22T04:00:00Z"),
    ],
)
def test_period_floor_is_utc(moment: str, period: PayoutPeriod, start: str) -> None:
    floor = period_floor(at(moment), period)
    assert floor == at(start)
    assert floor.utcoffset() == timedelta(0)


def test_period_length() -> None:
    assert period_length("hourly") == timedelta(hours=1)
    assert period_length("daily") == timedelta(days=1)


def cut(
    now: str,
    *,
    earliest: str | None,
    last: str | None = None,
    period: PayoutPeriod = "hourly",
    grace_s: float = 60,
) -> datetime | None:
    return next_scheduled_cut(
        now=at(now),
        last_end=None if last is None else at(last),
        earliest_unpaid=None if earliest is None else at(earliest),
        period=period,
        grace_s=grace_s,
    )


def test_nothing_to_cut_without_unpaid_charges() -> None:
    assert cut("2026-11-22T11:30:00Z", earliest=None) is None
    assert cut("2026-11-22T11:30:00Z", earliest=None, last="2026-11-22T11:00:00Z") is None


def test_the_current_period_is_never_cut() -> None:
    assert cut("2026-11-22T11:30:00Z", earliest="2026-11-22T11:00:00Z") is None
    assert cut("2026-11-22T11:30:00Z", earliest="2026-11-22T11:29:59Z") is None


def test_a_period_is_cut_once_its_grace_has_passed() -> None:
    earliest = "2026-11-22T10:20:00Z"
    assert cut("2026-11-22T11:00:59Z", earliest=earliest, grace_s=60) is None
    assert cut("2026-11-22T11:01:00Z", earliest=earliest, grace_s=60) == at("2026-11-22T11:00:00Z")
    assert cut("2026-11-22T11:00:00Z", earliest=earliest, grace_s=0) == at("2026-11-22T11:00:00Z")
    # A grace longer than a period only delays the cut.
    assert cut("2026-11-22T12:59:00Z", earliest=earliest, grace_s=7200) is None
    assert cut("2026-11-22T13:00:00Z", earliest=earliest, grace_s=7200) == at(
        "2026-11-22T11:00:00Z"
    )


def test_missed_periods_are_closed_one_by_one_oldest_first() -> None:
    now = "2026-11-22T14:05:00Z"
    # The worker was away: charges since 10:20, last cut at 10:00.
    first = cut(now, earliest="2026-11-22T10:20:00Z", last="2026-11-22T10:00:00Z")
    assert first == at("2026-11-22T11:00:00Z")
    # After that cut the earliest unpaid charge is in 11:00-12:00 (12:00 next), then 13:xx.
    assert cut(now, earliest="2026-11-22T11:10:00Z", last="2026-11-22T11:00:00Z") == at(
        "2026-11-22T12:00:00Z"
    )
    # Empty periods (12:00-13:00) are skipped, not cut.
    assert cut(now, earliest="2026-11-22T13:40:00Z", last="2026-11-22T12:00:00Z") == at(
        "2026-11-22T14:00:00Z"
    )
    assert cut(now, earliest="2026-11-22T14:01:00Z", last="2026-11-22T14:00:00Z") is None


def test_a_late_charge_goes_to_the_period_after_the_last_cut() -> None:
    # Recorded at 10:59:59, committed after the 11:00 cut: it is not cut "back" into 11:00.
    assert cut(
        "2026-11-22T12:01:00Z", earliest="2026-11-22T10:59:59Z", last="2026-11-22T11:00:00Z"
    ) == at("2026-11-22T12:00:00Z")
    assert (
        cut("2026-11-22T11:59:00Z", earliest="2026-11-22T10:59:59Z", last="2026-11-22T11:00:00Z")
        is None
    )


def test_after_a_manual_cut_between_boundaries() -> None:
    # `payouts run` at 11:20; the 11:00 boundary is behind it, 12:00 is next.
    last = "2026-11-22T11:20:00Z"
    assert cut("2026-11-22T11:40:00Z", earliest="2026-11-22T11:25:00Z", last=last) is None
    assert cut("2026-11-22T12:01:00Z", earliest="2026-11-22T11:25:00Z", last=last) == at(
        "2026-11-22T12:00:00Z"
    )
    # A manual cut just after a boundary, before the scheduled cut (within the grace).
    assert (
        cut("2026-11-22T11:00:50Z", earliest="2026-11-22T11:00:40Z", last="2026-11-22T11:00:30Z")
        is None
    )


def test_daily_periods_end_at_utc_midnight() -> None:
    assert cut("2026-11-23T00:00:30Z", earliest="2026-11-22T08:00:00Z", period="daily") is None
    assert cut("2026-11-23T00:01:00Z", earliest="2026-11-22T08:00:00Z", period="daily") == at(
        "2026-11-23T00:00:00Z"
    )
    # 23:30 UTC is already the 23rd in CET, but periods are UTC days.
    late = datetime(2026, 11, 23, 0, 30, tzinfo=CET).astimezone(UTC).isoformat()
    assert cut("2026-11-23T00:05:00Z", earliest=late, period="daily") == at("2026-11-23T00:00:00Z")
    assert cut(
        "2026-11-25T09:00:00Z",
        earliest="2026-11-23T00:00:00Z",
        last="2026-11-23T00:00:00Z",
        period="daily",
    ) == at("2026-11-24T00:00:00Z")


def test_cli_forms_that_scripts_rely_on() -> None:
    parser = build_parser()
    args = parser.parse_args(["payouts", "run"])
    assert args.until is None
    assert parser.parse_args(["payouts", "run", "--until", "now"]).until is None
    assert parser.parse_args(["payouts", "run", "--until", "2026-11-22"]).until == at(
        "2026-11-22T00:00:00Z"
    )
    listed = parser.parse_args(
        ["payouts", "list", "--payee", "acme", "--currency", "eur", "--status", "sent"]
    )
    assert (listed.payee, listed.currency, listed.status) == ("acme", "EUR", "sent")
    assert parser.parse_args(["payouts", "show", "po_1", "--format", "csv"]).payout_id == "po_1"
    configured = parser.parse_args(
        ["payees", "configure", "acme", "--stripe-account", "acct_1", "--stripe-payouts", "on"]
    )
    assert (configured.stripe_account, configured.stripe_payouts) == ("acct_1", "on")
    updated = parser.parse_args(["flows", "update", "flow_1", "--payee", "acme"])
    assert (updated.flow_id, updated.payee, updated.name) == ("flow_1", "acme", None)
    # flows create keeps its --payee, and the other flows actions are still there.
    assert parser.parse_args(["flows", "create", "f", "--name", "F", "--payee", "p"]).payee == "p"
    assert parser.parse_args(["flows", "pause", "f"]).status == "pause"


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        (["payouts", "run", "--until", "yesterday"], "invalid time"),
        (["payouts", "run", "--until", "2026-11-22T10:00:00"], "time zone"),
        (["payouts", "list", "--currency", "euro"], "currency code"),
        (["payouts", "list", "--status", "paid"], "invalid choice"),
        (["payees", "configure", "acme", "--stripe-account", "ba_123"], "acct_"),
        (["payees", "configure", "acme", "--stripe-payouts", "yes"], "invalid choice"),
    ],
)
def test_bad_payout_arguments_are_one_line_usage_errors(argv: list[str], mentions: str) -> None:
    with pytest.raises(UsageError, match=mentions):
        build_parser().parse_args(argv)
