"""The ledger's command line against real servers: balances show/list and usage reports."""

from __future__ import annotations

import csv
import functools
import io
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.support import (
    assert_one_line_error,
    cli,
    fetch,
    fetchval,
    grant,
    ingest_done,
    ok_json,
    produce,
    record,
    rfc3339,
    running_worker,
    setup_pipeline,
    usage,
    wait_for,
)
from workers.settings import Settings

NOW = datetime.now(UTC)
RANGE = ("--since", "2025-01-01", "--until", "2025-04-01")

# alice: three grants; usage over two months, one event stamped +01:00 just after midnight
# (its UTC day is the day before), one without a feature. The plan grant (soonest expiry)
# pays first. bob: one grant, then more usage than it holds. carol: a grant, no usage.
LOAD = [
    grant("alice", "g-year", 1000, expires_at=rfc3339(NOW + timedelta(days=365))),
    grant("alice", "g-plan", 300, cost_basis="0", source="plan",
          expires_at=rfc3339(NOW + timedelta(days=8))),
    grant("alice", "g-promo", 50, cost_basis="0", source="promotional"),
    usage("alice", "u1", 200, feature="chat", occurred_at="2025-01-31T10:00:00Z"),
    usage("alice", "u2", 100, feature="chat", occurred_at="2025-02-01T00:30:00+01:00"),
    usage("alice", "u3", 150, feature="images", occurred_at="2025-02-01T08:00:00Z"),
    usage("alice", "u4", 40, occurred_at="2025-03-10T12:00:00Z"),
    usage("alice", "u5", 60, feature="chat", occurred_at="2025-01-05T09:00:00Z"),
    grant("bob", "b-1", 50),
    usage("bob", "bu1", 80, feature="chat", occurred_at="2025-02-02T00:00:00Z"),
    grant("carol", "c-1", 100),
]  # fmt: skip


async def load(settings: Settings) -> None:
    await setup_pipeline(settings, partitions=1)
    async with running_worker(settings, "usage") as process:
        await produce(settings, settings.topic_usage, [record(e) for e in LOAD])
        await wait_for(functools.partial(ingest_done, process, len(LOAD)), what="the load")
    await fetchval(
        settings,
        "UPDATE customers SET low_balance_threshold = 900 WHERE customer_ref = 'alice'",
    )


async def remaining_by_ledger(settings: Settings, customer: str) -> dict[str, int]:
    rows = await fetch(
        settings,
        "SELECT g.reference, sum(e.grant_delta)::bigint AS remaining "
        "FROM ledger_entries e JOIN grants g USING (grant_id) "
        "WHERE e.customer_ref = $1 GROUP BY g.reference",
        customer,
    )
    return {r["reference"]: r["remaining"] for r in rows}


def usage_rows(rows: list[dict[str, Any]]) -> list[tuple[str, str | None, int, int]]:
    return [(r["period_start"], r["feature"], r["events"], r["tokens"]) for r in rows]


async def test_balances_and_usage_after_a_load(settings: Settings) -> None:
    await load(settings)

    alice = ok_json(settings, "balances", "show", "alice")
    assert alice == {
        **alice,
        "customer_ref": "alice",
        "balance": 800,
        "overage": 0,
        "low_balance_threshold": 900,
        "depleted": False,
        "below_low_threshold": True,
    }
    assert isinstance(alice["balance"], int)
    grants = alice["grants"]
    # Those with tokens left in the order they pay (soonest expiry first), then the used up.
    assert [g["reference"] for g in grants] == ["g-year", "g-promo", "g-plan"]
    assert all(
        set(g) >= {"reference", "tokens", "remaining", "expires_at", "source"} for g in grants
    )
    remaining = {g["reference"]: g["remaining"] for g in grants}
    assert remaining == {"g-plan": 0, "g-year": 750, "g-promo": 50}
    assert remaining == await remaining_by_ledger(settings, "alice")
    assert alice["balance"] == sum(remaining.values()) - alice["overage"]
    promo = grants[1]
    assert (promo["expires_at"], promo["source"], promo["cost_basis"]) == (
        None,
        "promotional",
        "0",
    )
    assert grants[0]["cost_basis"] == "0.0001"
    assert grants[0]["expires_at"].endswith("Z")
    assert [a["type"] for a in alice["recent_alerts"]] == ["credit_balance_recovered"]

    bob = ok_json(settings, "balances", "show", "bob")
    assert (bob["balance"], bob["overage"], bob["depleted"]) == (-30, 30, True)
    assert [(a["type"], a["balance"]) for a in bob["recent_alerts"]] == [
        ("credit_balance_depleted", -30),  # newest first
        ("credit_balance_recovered", 50),
    ]

    table = cli(settings, "balances", "show", "alice")
    assert table.returncode == 0, table.stderr
    for shown in ("alice", "800", "g-year", "recent alerts"):
        assert shown in table.stdout, table.stdout

    listed = ok_json(settings, "balances", "list")
    assert [(c["customer_ref"], c["balance"], c["grants_with_tokens"]) for c in listed] == [
        ("bob", -30, 0),
        ("carol", 100, 1),
        ("alice", 800, 2),
    ]
    depleted = ok_json(settings, "balances", "list", "--depleted")
    assert [(c["customer_ref"], c["depleted"]) for c in depleted] == [("bob", True)]
    assert [c["customer_ref"] for c in ok_json(settings, "balances", "list", "--limit", "2")] == [
        "bob",
        "carol",
    ]

    by_day = ok_json(settings, "usage", "alice", *RANGE, "--granularity", "day")
    assert usage_rows(by_day) == [
        ("2025-01-05T00:00:00Z", "chat", 1, 60),
        ("2025-01-31T00:00:00Z", "chat", 2, 300),  # u2 at 00:30+01:00 is Jan 31st in UTC
        ("2025-02-01T00:00:00Z", "images", 1, 150),
        ("2025-03-10T00:00:00Z", None, 1, 40),
    ]
    assert {r["customer_ref"] for r in by_day} == {"alice"}
    by_month = ok_json(settings, "usage", "alice", *RANGE, "--granularity", "month")
    assert usage_rows(by_month) == [
        ("2025-01-01T00:00:00Z", "chat", 3, 360),
        ("2025-02-01T00:00:00Z", "images", 1, 150),
        ("2025-03-01T00:00:00Z", None, 1, 40),
    ]
    chat = ok_json(
        settings, "usage", "alice", *RANGE, "--granularity", "month", "--feature", "chat"
    )
    assert usage_rows(chat) == [("2025-01-01T00:00:00Z", "chat", 3, 360)]
    images_by_day = ok_json(settings, "usage", "alice", *RANGE, "--feature", "images")
    assert usage_rows(images_by_day) == [("2025-02-01T00:00:00Z", "images", 1, 150)]
    narrow = ok_json(
        settings, "usage", "alice", "--since", "2025-01-31T12:00:00Z", "--until", "2025-02-01"
    )
    assert usage_rows(narrow) == [("2025-01-31T00:00:00Z", "chat", 1, 100)]
    assert ok_json(settings, "usage", "alice") == []  # default: this month so far

    as_csv = cli(settings, "usage", "alice", *RANGE, "--granularity", "month", "--format", "csv")
    assert as_csv.returncode == 0, as_csv.stderr
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [(r["period_start"], r["feature"], r["events"], r["tokens"]) for r in rows] == [
        ("2025-01-01T00:00:00Z", "chat", "3", "360"),
        ("2025-02-01T00:00:00Z", "images", "1", "150"),
        ("2025-03-01T00:00:00Z", "", "1", "40"),
    ]
    bob_csv = cli(settings, "balances", "list", "--depleted", "--format", "csv")
    assert bob_csv.stdout.splitlines()[0].startswith("customer_ref,balance,overage")
    assert bob_csv.stdout.splitlines()[1].startswith("bob,-30,30")


async def test_ledger_cli_errors_are_one_line(settings: Settings) -> None:
    assert_one_line_error(
        cli(settings, "balances", "show", "nobody"), code=1, mentions="no customer 'nobody'"
    )
    assert_one_line_error(
        cli(settings, "usage", "nobody", *RANGE), code=1, mentions="no customer 'nobody'"
    )
    assert_one_line_error(
        cli(settings, "usage", "alice", "--granularity", "week"),
        code=2,
        mentions="invalid choice: 'week'",
    )
    assert_one_line_error(
        cli(settings, "usage", "alice", "--since", "2025-02-01", "--until", "2025-01-01"),
        code=2,
        mentions="--since (2025-02-01T00:00:00Z) must not be after --until (2025-01-01T00:00:00Z)",
    )
    assert_one_line_error(cli(settings, "usage"), code=2, mentions="CUSTOMER")
    assert_one_line_error(
        cli(settings, "balances", "list", "--limit", "0"), code=2, mentions=">= 1"
    )
    assert ok_json(settings, "balances", "list", "--depleted") == []
