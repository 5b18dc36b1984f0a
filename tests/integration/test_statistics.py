"""ANALYZE keeps the planner's statistics for the columns queries search by, and skips the
stored-only ones (payloads, fingerprints, digests, source positions: migration 0012), which
were most of autovacuum's work in a drain."""

from __future__ import annotations

import asyncpg


async def test_analyze_skips_the_stored_only_columns(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            """
            INSERT INTO charges (flow_id, reference, customer_ref, amount, currency, metadata,
                                 occurred_at, fingerprint, payload, source_topic,
                                 source_partition, source_offset, raw_digest)
            SELECT 'flow_' || (i % 3), 'job-' || i, 'cust-' || (i % 7), i, 'USD', '{}',
                   now(), sha256(i::text::bytea), '{"a": 1}', 'billing.charges', 0, i,
                   sha256(i::text::bytea)
            FROM generate_series(1, 500) AS i
            """
        )
        await conn.execute("ANALYZE charges")
        analyzed = {
            row["attname"]
            for row in await conn.fetch("SELECT attname FROM pg_stats WHERE tablename = 'charges'")
        }
    finally:
        await conn.close()
    stored_only = {
        "metadata", "payload", "fingerprint", "raw_digest",
        "source_topic", "source_partition", "source_offset",
    }  # fmt: skip
    assert not analyzed & stored_only
    assert {"flow_id", "reference", "customer_ref", "recorded_at", "payout_id"} <= analyzed


async def test_every_event_table_leaves_out_the_same_stored_only_columns(
    database_url: str,
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            """
            SELECT c.relname, a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
            WHERE a.attstattarget = 0 AND c.relnamespace = 'public'::regnamespace
            """
        )
    finally:
        await conn.close()
    unanalyzed: dict[str, set[str]] = {}
    for row in rows:
        unanalyzed.setdefault(row["relname"], set()).add(row["attname"])
    origin = {"fingerprint", "raw_digest", "source_topic", "source_partition", "source_offset"}
    assert unanalyzed == {
        "charges": origin | {"metadata", "payload"},
        "usage_events": origin | {"metadata"},
        "grants": origin | {"payload", "description"},
        "credit_voids": origin | {"payload"},
        "ledger_entries": {"amount", "grant_delta", "overage_delta", "balance_after", "reference"},
        "outbox": {"record_key", "record_value", "headers"},
        "webhook_deliveries": {"payload"},
    }
