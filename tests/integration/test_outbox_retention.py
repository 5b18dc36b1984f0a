"""Outbox retention: the relay removes published rows past CHARGELINE_OUTBOX_RETENTION_S, a
batch at a time, and keeps every unpublished row and every row the webhook fan-out has not
read; `verify` stays green, comparing alerts and dead letters with the outbox only after
the mark of what was removed."""

from __future__ import annotations

import functools
from typing import Any

from tests.support import (
    assert_invariants,
    fetch,
    fetchval,
    grant,
    ingest_done,
    outbox_empty,
    produce,
    record,
    running_worker,
    setup_pipeline,
    usage,
    wait_for,
)
from workers import db
from workers.jobs.outbox import PRUNE_BATCH, OutboxRelay
from workers.metrics import Metrics
from workers.settings import Settings


async def test_published_rows_past_retention_go_and_the_others_stay(settings: Settings) -> None:
    await setup_pipeline(settings, partitions=1)
    conn = await db.connect(settings.dsn)
    try:
        insert = (
            "INSERT INTO outbox (kind, topic, record_value, created_at, published_at, "
            "webhooks_pending) VALUES ('alert', 't', '{}', $1::text::timestamptz, $2::text::timestamptz, "
            "$3) "
            "RETURNING outbox_id"
        )
        old, recent = "2026-01-01T00:00:00Z", "now"
        rows = {
            "published long ago": await conn.fetchval(insert, old, old, False),
            "published just now": await conn.fetchval(insert, recent, recent, False),
            "never published": await conn.fetchval(insert, old, None, False),
            "published, not yet read by the webhook fan-out": await conn.fetchval(
                insert, old, old, True
            ),
        }
        retention = settings.model_copy(update={"outbox_retention_s": 3600.0})
        relay = OutboxRelay(retention, None, None, Metrics())  # type: ignore[arg-type]
        assert await relay.prune_once(conn) == 1
        assert await relay.prune_once(conn) == 0
        left = {r["outbox_id"] for r in await conn.fetch("SELECT outbox_id FROM outbox")}
        assert left == set(rows.values()) - {rows["published long ago"]}
        assert str(await conn.fetchval("SELECT pruned_through FROM outbox_retention")).startswith(
            "2026-01-01"
        )
    finally:
        await conn.close()


async def test_a_tiny_retention_empties_the_outbox_and_verify_stays_green(
    settings: Settings,
) -> None:
    """The whole path: alerts written and published, then removed by the relay itself; the
    invariants (alerts in the outbox exactly once, dead letters on billing.dlq) still hold."""
    settings = settings.model_copy(update={"outbox_retention_s": 0.2})
    await setup_pipeline(settings, partitions=1)
    events: list[dict[str, Any] | bytes] = [
        grant("c1", "g1", 100), usage("c1", "u1", 150), grant("c1", "g2", 100), b"{bad",
    ]  # fmt: skip
    async with running_worker(settings) as process:
        await produce(settings, settings.topic_usage, [record(e) for e in events])
        await wait_for(functools.partial(ingest_done, process, len(events)), what="events")
        await wait_for(functools.partial(outbox_empty, settings), what="published")

        async def removed() -> bool:
            return bool(await fetchval(settings, "SELECT count(*) FROM outbox") == 0)

        await wait_for(removed, what="the relay to remove what it published")
    kinds = {k["type"] for k in await fetch(settings, "SELECT type FROM alerts")}
    assert "credit_balance_depleted" in kinds  # alerts were written, published and removed
    assert await fetchval(settings, "SELECT count(*) FROM dead_letters") == 1
    assert await fetchval(settings, "SELECT pruned_through > '-infinity' FROM outbox_retention")
    await assert_invariants(settings)
    assert PRUNE_BATCH >= 100  # batches stay small but not per row
