"""Known records (workers/ingest/known.py), on real servers: a lane that probes counts the records
Postgres holds byte for byte as duplicates without parsing them, and everything else (the
same event in other bytes, another payload under a stored key, a copy under the wrong record
key, malformed bytes, new events) takes the full path with the outcome it always had."""

from __future__ import annotations

from collections import Counter
from typing import Any

import asyncpg
import orjson

from tests.support import (
    assert_invariants,
    charge,
    consume_all,
    fetch,
    grant,
    ingest_done,
    produce,
    record,
    running_worker,
    setup_pipeline,
    usage,
    wait_for,
)
from workers.app import build_handlers
from workers.db import create_pool
from workers.ingest.parse import raw_digest
from workers.ingest.processor import BatchProcessor, BatchResult, Part
from workers.metrics import Metrics
from workers.settings import Settings

FIRST_ROUND = [
    record(grant("c1", "g1", 100)),
    record(usage("c1", "u1", 30, feature="chat")),
    record(usage("c2", "u2", 5)),
    record(grant("c2", "g2", 50)),
]


async def process(
    settings: Settings, topic: str, records: list[Any], *, probe_first: bool
) -> tuple[BatchResult, list[Part]]:
    """One batch through a BatchProcessor, in one transaction, as ``chargeline replay`` does."""
    kind = "usage" if topic == settings.topic_usage else "charges"
    processor = BatchProcessor(
        settings, build_handlers(settings, [kind]), Metrics(), probe_first=probe_first
    )
    parts = processor.prepare(records)
    pool = await create_pool(settings.dsn)
    try:
        async with pool.acquire() as conn, conn.transaction():
            return await processor.apply(conn, parts), parts
    finally:
        await pool.close()


def outcomes(result: BatchResult) -> Counter[tuple[str, str]]:
    return Counter({(t, o): n for (_, t, o), n in result.counts.items()})


async def test_a_probing_lane_parses_only_what_postgres_does_not_hold_byte_for_byte(
    settings: Settings,
) -> None:
    await setup_pipeline(settings, partitions=1)
    await produce(settings, settings.topic_usage, FIRST_ROUND)
    first = await consume_all(settings, settings.topic_usage, expected=len(FIRST_ROUND))
    result, _ = await process(settings, settings.topic_usage, first, probe_first=False)
    assert outcomes(result) == {("credit_grant", "recorded"): 2, ("usage", "recorded"): 2}
    assert result.known == 0
    digests = await fetch(
        settings,
        "SELECT reference, raw_digest FROM usage_events UNION ALL "
        "SELECT reference, raw_digest FROM grants",
    )
    by_value = {orjson.loads(v)["reference"]: raw_digest(v) for _, v in FIRST_ROUND}
    assert {row["reference"]: row["raw_digest"] for row in digests} == by_value

    same_event_other_bytes = orjson.dumps(
        dict(reversed(list(usage("c1", "u1", 30, feature="chat").items())))
    )
    second_round = [
        *FIRST_ROUND,  # byte for byte: known
        (b"c1", same_event_other_bytes),  # a duplicate, found by fingerprint
        record(usage("c2", "u2", 6)),  # another payload under a stored key: a conflict
        (b"c9", FIRST_ROUND[1][1]),  # known bytes under the wrong record key
        record(b'{"type": "usage", "customer_ref": "c1"', "c1"),  # malformed
        record(usage("c1", "u3", 10)),  # new
    ]
    await produce(settings, settings.topic_usage, second_round)
    both = await consume_all(
        settings, settings.topic_usage, expected=len(FIRST_ROUND) + len(second_round)
    )
    replayed = both[len(FIRST_ROUND) :]
    result, parts = await process(settings, settings.topic_usage, replayed, probe_first=True)

    assert result.known == len(FIRST_ROUND)
    assert sum(len(part.parsed) + len(part.rejected) for part in parts) == 5  # the rest
    assert all(part.unparsed is None for part in parts)
    assert outcomes(result) == {
        ("credit_grant", "duplicate"): 2,
        ("usage", "duplicate"): 3,  # two known, one by fingerprint
        ("usage", "conflict"): 1,
        ("usage", "rejected"): 1,  # key_mismatch
        ("unknown", "invalid"): 1,
        ("usage", "recorded"): 1,
    }
    assert result.dead_letters == {"reference_conflict": 1, "key_mismatch": 1, "invalid_json": 1}
    balances = await fetch(settings, "SELECT customer_ref, balance FROM customers ORDER BY 1")
    assert [tuple(row) for row in balances] == [("c1", 60), ("c2", 45)]
    await assert_invariants(settings)


async def test_rows_without_a_digest_are_judged_by_fingerprint(settings: Settings) -> None:
    """Rows stored before migration 0009 have no digest: never known, still duplicates."""
    await setup_pipeline(settings, partitions=1, flows=[("flow_a", "active")])
    charges = [record(charge("flow_a", "c1", f"r{n}", 100 + n)) for n in range(3)]
    await produce(settings, settings.topic_charges, charges)
    first = await consume_all(settings, settings.topic_charges, expected=len(charges))
    await process(settings, settings.topic_charges, first, probe_first=False)
    conn = await asyncpg.connect(settings.dsn)
    try:
        await conn.execute("UPDATE charges SET raw_digest = NULL WHERE reference = 'r0'")
    finally:
        await conn.close()

    result, parts = await process(settings, settings.topic_charges, first, probe_first=True)
    assert result.known == 2
    assert [parsed.event.reference for part in parts for parsed in part.parsed] == ["r0"]
    assert outcomes(result) == {("charge", "duplicate"): 3}
    assert result.dead_letters == {}


async def test_a_new_consumer_group_looks_records_up_from_its_first_batch(
    settings: Settings,
) -> None:
    """Partitions a group has never committed on are read from their start: a backfill by
    a new group probes its first batch (no batch of re-reads parsed in full to learn it),
    and a group whose records are new stops probing after one lookup that found nothing."""
    await setup_pipeline(settings, partitions=2)
    records = [record(usage(f"c{n % 5}", f"u{n}", 1)) for n in range(200)]
    await produce(settings, settings.topic_usage, records)
    async with running_worker(settings, "usage") as first:
        await wait_for(lambda: ingest_done(first, len(records)), what="the first group")
    assert first.ingest is not None
    assert first.ingest.totals.outcome_totals() == {"recorded": 200}
    assert first.ingest.totals.known == 0

    backfill = settings.model_copy(update={"consumer_group": f"{settings.consumer_group}-b"})
    async with running_worker(backfill, "usage") as second:
        await wait_for(lambda: ingest_done(second, len(records)), what="the backfill")
    assert second.ingest is not None
    assert second.ingest.totals.outcome_totals() == {"duplicate": 200}
    assert second.ingest.totals.known == 200  # none parsed
    await assert_invariants(settings)
