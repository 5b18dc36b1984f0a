"""A small part's statements run on generic plans, kept by the connection; a large part's are
planned for its arrays' sizes (``GENERIC_PLAN_RECORDS``). Either way the outcome is the same,
and the choice lasts one transaction: the connection goes back to the pool as it came."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any

from tests.support import assert_invariants, fetch, grant, record, usage
from workers import db
from workers.ingest.dedupe import Verdict
from workers.ingest.parse import BareRecord, Parsed
from workers.ingest.processor import GENERIC_PLAN_RECORDS, BatchProcessor, Handler
from workers.ingest.usage import UsageHandler
from workers.metrics import Metrics
from workers.settings import Settings


class _PlanModeSeen:
    """The usage handler, noting the plan mode its statements run under."""

    def __init__(self, inner: UsageHandler) -> None:
        self.inner = inner
        self.name = inner.name
        self.topic = inner.topic
        self.accepted_types = inner.accepted_types
        self.modes: list[str] = []

    async def apply(self, conn: Any, events: list[Parsed], alerts: Counter[str]) -> list[Verdict]:
        self.modes.append(await conn.fetchval("SELECT current_setting('plan_cache_mode')"))
        return await self.inner.apply(conn, events, alerts)


def _records(settings: Settings, events: list[dict[str, Any]], first: int) -> list[BareRecord]:
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    out = []
    for offset, event in enumerate(events, start=first):
        key, value = record(event)
        out.append(BareRecord(settings.topic_usage, 0, offset, key, value, now_ms))
    return out


async def test_small_parts_reuse_plans_and_large_ones_are_planned_each_time(
    settings: Settings,
) -> None:
    seen = _PlanModeSeen(UsageHandler(settings.topic_usage, settings.topic_alerts))
    handler: Handler = seen
    processor = BatchProcessor(settings, [handler], Metrics())
    customers = [f"c{n}" for n in range(7)]
    small = [grant(c, f"g-{c}", 1_000) for c in customers] + [usage("c0", "u-small", 5)]
    large = [usage(customers[n % 7], f"u-{n}", 1 + n % 3) for n in range(GENERIC_PLAN_RECORDS + 1)]
    # One connection, so that the large part runs on the connection the small one used.
    pool = await db.create_pool(settings.dsn, max_size=1)
    try:
        for events, first in ((small, 0), (large, len(small)), (small, 0)):
            for part in processor.prepare(_records(settings, events, first)):
                await processor.transact(pool, part)
        async with pool.acquire() as conn:
            after = await conn.fetchval("SELECT current_setting('plan_cache_mode')")
    finally:
        await pool.close()
    # The small batch again at the end: its duplicates found by the kept generic plans.
    assert seen.modes == ["force_generic_plan", "force_custom_plan", "force_generic_plan"]
    assert after == "force_custom_plan"
    used: Counter[str] = Counter({"c0": 5})
    for event in large:
        used[event["customer_ref"]] += event["tokens"]
    rows = await fetch(settings, "SELECT customer_ref, balance FROM customers ORDER BY 1")
    assert {r["customer_ref"]: r["balance"] for r in rows} == {
        c: 1_000 - used[c] for c in customers
    }
    counted = await fetch(settings, "SELECT count(*) AS n FROM usage_events")
    assert counted[0]["n"] == len(large) + 1
    await assert_invariants(settings)
