"""Usage and grants through the token ledger, alerts on billing.alerts."""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta

from tests.support import (
    alerts_on_topic,
    assert_invariants,
    fetch,
    fetchval,
    grant,
    ingest_done,
    outbox_empty,
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


async def balance(settings: Settings, customer: str) -> int:
    return int(
        await fetchval(settings, "SELECT balance FROM customers WHERE customer_ref = $1", customer)
    )


async def ledger_sum(settings: Settings, customer: str) -> int:
    return int(
        await fetchval(
            settings,
            "SELECT coalesce(sum(amount), 0) FROM ledger_entries WHERE customer_ref = $1",
            customer,
        )
    )


async def run_load(settings: Settings, events: list, *, extra_wait=None) -> None:  # type: ignore[no-untyped-def,type-arg]
    async with running_worker(settings) as process:
        await produce(settings, settings.topic_usage, [record(e) for e in events])
        await wait_for(
            functools.partial(ingest_done, process, len(events)), what=f"{len(events)} records"
        )
        if extra_wait is not None:
            await wait_for(extra_wait, what="extra condition")
        await wait_for(functools.partial(outbox_empty, settings), what="outbox published")


async def test_orb_token_guide_scenario(settings: Settings) -> None:
    await setup_pipeline(settings, partitions=2)
    events = [
        grant(
            "user_123",
            "purchase-789",
            100_000,
            expires_at=rfc3339(NOW + timedelta(days=365)),
            description="100K tokens",
        ),
        grant(
            "user_123",
            "plan-2026-11",
            20_000,
            cost_basis="0",
            source="plan",
            expires_at=rfc3339(NOW + timedelta(days=8)),
        ),
        usage("user_123", "req-1", 15_000, feature="chat"),
        usage("user_123", "req-2", 10_000, feature="chat"),
        usage("user_123", "req-3", 95_120, feature="images"),
        usage("user_123", "req-4", 10),
        grant("user_123", "purchase-790", 100_000, expires_at=rfc3339(NOW + timedelta(days=365))),
    ]
    await run_load(settings, events)

    assert await balance(settings, "user_123") == await ledger_sum(settings, "user_123") == 99_870
    grants = {
        r["reference"]: r["remaining"]
        for r in await fetch(settings, "SELECT reference, remaining FROM grants")
    }
    assert grants == {"plan-2026-11": 0, "purchase-789": 0, "purchase-790": 99_870}
    paid_req2 = await fetch(
        settings,
        "SELECT g.reference, -e.amount AS tokens FROM ledger_entries e JOIN grants g USING (grant_id) "
        "WHERE e.reference = 'req-2' ORDER BY e.seq",
    )
    assert [(r["reference"], r["tokens"]) for r in paid_req2] == [
        ("plan-2026-11", 5_000),
        ("purchase-789", 5_000),
    ]
    alerts = await alerts_on_topic(settings, expected=3)
    assert [
        (a["type"], a["previous_balance"], a["balance"], a["cause"]["reference"]) for a in alerts
    ] == [
        ("credit_balance_recovered", 0, 100_000, "purchase-789"),
        ("credit_balance_depleted", 95_000, -120, "req-3"),
        ("credit_balance_recovered", -130, 99_870, "purchase-790"),
    ]
    assert len({a["alert_id"] for a in alerts}) == 3
    await assert_invariants(settings)


async def test_usage_then_grant_in_one_batch_gives_depleted_then_recovered(
    settings: Settings,
) -> None:
    await setup_pipeline(settings, partitions=1)
    await run_load(settings, [grant("c1", "g0", 50)])
    await run_load(settings, [usage("c1", "u1", 80), grant("c1", "g1", 100)])
    alerts = await alerts_on_topic(settings, expected=3)
    assert [a["type"] for a in alerts] == [
        "credit_balance_recovered",
        "credit_balance_depleted",
        "credit_balance_recovered",
    ]
    assert await balance(settings, "c1") == 70
    # g0 paid its last token ('used'); g1 has tokens left ('active'): what the open-grant
    # indexes name (migration 0008).
    rows = await fetch(settings, "SELECT reference, status, remaining FROM grants ORDER BY 1")
    assert [tuple(r) for r in rows] == [("g0", "used", 0), ("g1", "active", 70)]


async def test_spending_a_grant_is_a_hot_update(settings: Settings) -> None:
    """The update each usage event makes to its grant changes no indexed column (0008), so
    Postgres makes it heap-only: no new index entries, no index bloat under load."""
    await setup_pipeline(settings, partitions=1)
    await run_load(settings, [grant("c1", "g0", 1000)])
    await run_load(settings, [usage("c1", "u1", 10)])

    async def hot_updates() -> bool:
        hot = await fetchval(
            settings, "SELECT n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'grants'"
        )
        return bool(hot)

    await wait_for(hot_updates, what="a HOT update of grants in pg_stat_user_tables")
    assert await balance(settings, "c1") == 990


async def test_a_usage_event_writes_one_index_in_each_table(settings: Settings) -> None:
    """The B-trees a usage event writes (0010): the dedup key of usage_events and the
    customer sequence of ledger_entries, both primary keys; no identity-column B-tree, only
    the BRIN index verify reads new usage events by (0020), a few pages for the table."""
    await setup_pipeline(settings, partitions=1)
    indexes = await fetch(
        settings,
        "SELECT tablename, indexname FROM pg_indexes "
        "WHERE tablename IN ('usage_events', 'ledger_entries') ORDER BY 1, 2",
    )
    assert [tuple(row) for row in indexes] == [
        ("ledger_entries", "ledger_entries_customer_seq"),
        ("usage_events", "usage_events_dedup_key"),
        ("usage_events", "usage_events_usage_id_brin"),
    ]
    primary = await fetch(
        settings,
        "SELECT conrelid::regclass::text AS tablename, conname FROM pg_constraint "
        "WHERE contype = 'p' AND conrelid IN ('usage_events'::regclass, "
        "'ledger_entries'::regclass) ORDER BY 1",
    )
    assert [tuple(row) for row in primary] == [
        ("ledger_entries", "ledger_entries_customer_seq"),
        ("usage_events", "usage_events_dedup_key"),
    ]


async def test_replaying_the_usage_topic_changes_nothing(settings: Settings) -> None:
    await setup_pipeline(settings, partitions=2)
    events = [grant(f"c{n}", f"g{n}", 1_000) for n in range(10)]
    events += [usage(f"c{n % 10}", f"u{n}", 150) for n in range(100)]
    await run_load(settings, events)
    before = await fetch(settings, "SELECT customer_ref, balance FROM customers ORDER BY 1")
    entries = await fetchval(settings, "SELECT count(*) FROM ledger_entries")
    alerts = await fetchval(settings, "SELECT count(*) FROM alerts")
    # A new consumer group reads the whole topic again from offset 0.
    replay = settings.model_copy(update={"consumer_group": settings.consumer_group + "-replay"})
    async with running_worker(replay, "usage") as process:
        await wait_for(functools.partial(ingest_done, process, len(events)), what="replay")
        assert process.ingest is not None
        assert process.ingest.totals.outcome_totals()["duplicate"] == len(events)
    assert await fetch(settings, "SELECT customer_ref, balance FROM customers ORDER BY 1") == before
    assert await fetchval(settings, "SELECT count(*) FROM ledger_entries") == entries
    assert await fetchval(settings, "SELECT count(*) FROM alerts") == alerts
    await assert_invariants(settings)


async def test_malformed_usage_and_grants_are_dead_lettered_and_neighbours_applied(
    settings: Settings,
) -> None:
    await setup_pipeline(settings, partitions=1)
    bad = [
        {**usage("c1", "float", 1), "tokens": 1.5},
        usage("c1", "negative", -5),
        {**usage("c1", "typo", 1), "tokenz": 3},
        grant("c1", "bad-currency", 10, currency="ABC"),
        grant("c1", "bad-cost", 10, cost_basis="1e-4"),
        grant(
            "c1",
            "backwards",
            10,
            effective_at=rfc3339(NOW),
            expires_at=rfc3339(NOW - timedelta(days=1)),
        ),
        {
            "type": "credit_void",
            "customer_ref": "c1",
            "reference": "v1",
            "grant_reference": "nope",
            "reason": "refund",
        },
    ]
    good = [grant("c1", "g1", 100), usage("c1", "u1", 30)]
    events = [good[0], *bad[:4], good[1], *bad[4:]]
    await run_load(settings, events)
    reasons = [
        r["reason"]
        for r in await fetch(settings, 'SELECT reason FROM dead_letters ORDER BY "offset"')
    ]
    assert reasons == ["invalid_event"] * 6 + ["unknown_grant"]
    assert await balance(settings, "c1") == 70
    assert await fetchval(settings, "SELECT count(*) FROM credit_voids") == 0


async def test_grants_expiring_during_a_run_deplete_through_the_ledger(settings: Settings) -> None:
    await setup_pipeline(settings, partitions=1)
    fast = settings.model_copy(update={"expiry_interval_s": 0.2})

    async def expired() -> bool:
        return bool(
            await fetchval(settings, "SELECT count(*) FROM ledger_entries WHERE kind = 'expiry'")
        )

    async with running_worker(fast) as process:
        await produce(settings, settings.topic_usage, [record(usage("warmup", "w1", 1))])
        await wait_for(functools.partial(ingest_done, process, 1), what="worker joined")
        # The worker is in its group now: the grant expires while it runs, after the usage.
        expires = datetime.now(UTC) + timedelta(seconds=3)
        events = [grant("c1", "short", 100, expires_at=rfc3339(expires)), usage("c1", "u1", 40)]
        await produce(settings, settings.topic_usage, [record(e) for e in events])
        await wait_for(functools.partial(ingest_done, process, 3), what="3 records")
        assert not await expired()
        await wait_for(expired, what="the expiry entry")
        await wait_for(functools.partial(outbox_empty, settings), what="outbox published")
    entries = await fetch(
        settings, "SELECT kind, amount FROM ledger_entries WHERE customer_ref = 'c1' ORDER BY seq"
    )
    assert [(e["kind"], e["amount"]) for e in entries] == [
        ("grant", 100),
        ("usage", -40),
        ("expiry", -60),
    ]
    assert await balance(settings, "c1") == 0
    alerts = await alerts_on_topic(settings, expected=2)
    assert [(a["type"], a["cause"]["type"], a["cause"]["reference"]) for a in alerts] == [
        ("credit_balance_recovered", "credit_grant", "short"),
        ("credit_balance_depleted", "expiry", "short"),
    ]
