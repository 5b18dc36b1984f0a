"""Nothing a producer sends may stop a partition.

- Records that once broke the worker, through the real worker: a grant whose expiry passed
  before it arrived (credited and expired at once), instants that overflow once converted
  to UTC (dead-lettered), and the lane keeps flowing; a restart finds nothing to redo.
- The last line of defence: a record that makes the apply step raise (a planted bug in the
  handler, a constraint Postgres enforces) is isolated, dead-lettered ``unprocessable``
  with the exception in its detail, and its neighbours are applied in order.
- A stalled lane (a lock never released) is reported while Postgres answers: log, gauge,
  readiness; and stops being reported once it moves.
"""

from __future__ import annotations

import functools
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
from structlog.testing import capture_logs

from tests.support import (
    assert_invariants,
    charge,
    fetch,
    fetchval,
    grant,
    group_offsets,
    ingest_done,
    log_end_offsets,
    outbox_empty,
    produce,
    record,
    rfc3339,
    running_worker,
    setup_pipeline,
    usage,
    wait_for,
)
from workers import db
from workers.ingest.dedupe import Verdict
from workers.ingest.parse import BareRecord, Parsed
from workers.ingest.processor import BatchProcessor, Handler
from workers.ingest.usage import UsageHandler
from workers.metrics import Metrics
from workers.settings import Settings


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def _committed_to_end(settings: Settings, topic: str) -> bool:
    ends = await log_end_offsets(settings, topic)
    committed = await group_offsets(settings, topic)
    return all(committed.get(p) == end for p, end in ends.items() if end)


async def test_grant_expired_before_it_arrived_is_credited_and_expired_at_once(
    settings: Settings,
) -> None:
    yesterday = rfc3339(datetime.now(UTC) - timedelta(days=1))
    await setup_pipeline(settings, partitions=1)
    events = [
        grant("hx", "g-past", 100_000, expires_at=yesterday),
        usage("hx", "u-after", 10),
        grant("other", "g-other", 500),
        usage("other", "u-other", 200),
        # In overage when it comes, it pays none: the same balance as in the other order.
        usage("hy", "u-before", 50),
        grant("hy", "g-past-hy", 100_000, expires_at=yesterday),
    ]
    async with running_worker(settings, "usage", "outbox") as process:
        await produce(settings, settings.topic_usage, [record(e) for e in events])
        await wait_for(functools.partial(ingest_done, process, len(events)), what="the records")
        await wait_for(functools.partial(outbox_empty, settings), what="outbox published")
    assert await fetchval(settings, "SELECT count(*) FROM dead_letters") == 0
    balances = {
        r["customer_ref"]: r["balance"]
        for r in await fetch(settings, "SELECT customer_ref, balance FROM customers")
    }
    assert balances == {"hx": -10, "other": 300, "hy": -50}
    row = (await fetch(settings, "SELECT * FROM grants WHERE reference = 'g-past'"))[0]
    assert row["status"] == "expired"
    assert row["remaining"] == 0
    assert row["effective_at"] == row["expires_at"]
    entries = await fetch(
        settings,
        "SELECT kind, amount FROM ledger_entries WHERE customer_ref = 'hx' ORDER BY seq",
    )
    assert [(e["kind"], e["amount"]) for e in entries] == [
        ("grant", 100_000),
        ("expiry", -100_000),
        ("usage", -10),
    ]
    alerts = await fetch(
        settings, "SELECT type FROM alerts WHERE customer_ref = 'hx' ORDER BY ledger_seq"
    )
    # The grant is one event, judged once (0 before, 0 after); the usage takes hx from 0 to
    # -10, which crosses nothing.
    assert [a["type"] for a in alerts] == []
    await assert_invariants(settings)
    # A restart finds nothing to redo: the group's offsets are at the end of the log.
    assert await _committed_to_end(settings, settings.topic_usage)


async def test_instants_out_of_range_in_utc_are_dead_lettered_and_the_lane_flows(
    settings: Settings,
) -> None:
    await setup_pipeline(settings, partitions=1, flows=[("flow_a", "active")])
    charges = [
        charge("flow_a", "c1", "early", occurred_at="0001-01-01T00:00:00+01:00"),
        charge("flow_a", "c1", "fine-1"),
        charge("flow_a", "c1", "first-instant", occurred_at="0001-01-01T00:00:00Z"),
        charge("flow_a", "c1", "second-instant", occurred_at="0001-01-01T00:00:00.000001Z"),
        charge("flow_a", "c1", "fine-2"),
    ]
    usage_events = [
        grant("c1", "late", 100, expires_at="9999-12-31T23:59:59-01:00"),
        grant("c1", "last-instant", 100, expires_at="9999-12-31T23:59:59.999999Z"),
        grant("c1", "last-but-one", 100, expires_at="9999-12-31T23:59:59.999998Z"),
        usage("c1", "u1", 30),
    ]
    async with running_worker(settings, "charges", "usage") as process:
        await produce(settings, settings.topic_charges, [record(e) for e in charges])
        await produce(settings, settings.topic_usage, [record(e) for e in usage_events])
        await wait_for(functools.partial(ingest_done, process, 9), what="9 records")
    dead = await fetch(settings, "SELECT reason, detail, record_value FROM dead_letters")
    refs = {orjson.loads(d["record_value"])["reference"]: d for d in dead}
    # The first and last instants a datetime holds are -infinity and infinity to the driver.
    assert set(refs) == {"early", "late", "first-instant", "last-instant"}
    for letter in refs.values():
        assert letter["reason"] == "invalid_event"
        assert (
            "after 0001-01-01T00:00:00Z and before 9999-12-31T23:59:59.999999Z"
            in (letter["detail"])
        )
    recorded = await fetch(
        settings, "SELECT reference, occurred_at::text AS at FROM charges ORDER BY reference"
    )
    assert [(r["reference"], r["at"]) for r in recorded if r["reference"].endswith("instant")] == [
        ("second-instant", "0001-01-01 00:00:00.000001+00"),
    ]
    assert [r["reference"] for r in recorded] == ["fine-1", "fine-2", "second-instant"]
    expiry = await fetchval(
        settings, "SELECT expires_at::text FROM grants WHERE reference = 'last-but-one'"
    )
    assert expiry == "9999-12-31 23:59:59.999998+00"
    assert await fetchval(settings, "SELECT balance FROM customers WHERE customer_ref='c1'") == 70
    await assert_invariants(settings)
    assert await _committed_to_end(settings, settings.topic_charges)
    assert await _committed_to_end(settings, settings.topic_usage)


class _PlantedBug:
    """The usage handler with a bug planted: any batch holding reference ``planted`` raises."""

    def __init__(self, inner: UsageHandler) -> None:
        self.inner = inner
        self.name = inner.name
        self.topic = inner.topic
        self.accepted_types = inner.accepted_types

    async def apply(self, conn: Any, events: list[Parsed], alerts: Counter[str]) -> list[Verdict]:
        if any(p.event.reference == "planted" for p in events):
            raise ZeroDivisionError("planted bug")
        return await self.inner.apply(conn, events, alerts)


async def test_a_planted_bug_is_isolated_and_its_neighbours_applied_in_order(
    settings: Settings,
) -> None:
    metrics = Metrics()
    handler: Handler = _PlantedBug(UsageHandler(settings.topic_usage, settings.topic_alerts))
    processor = BatchProcessor(settings, [handler], metrics)
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    events: list[dict[str, Any] | bytes] = [
        grant("c1", "g1", 100),
        usage("c1", "u1", 60),
        usage("c1", "planted", 1),
        usage("c1", "u2", 60),  # must come after u1: it is what depletes the balance
        b'{"type": "usage", "customer_ref": "c1"',  # malformed, beside the bug
        usage("c1", "u3", 5),
    ]
    records = []
    for offset, event in enumerate(events):
        key, value = record(event, key="c1")
        records.append(BareRecord(settings.topic_usage, 0, offset, key, value, now_ms))
    pool = await db.create_pool(settings.dsn)
    try:
        with capture_logs() as logs:
            [part] = processor.prepare(records)
            result = await processor.transact(pool, part)
    finally:
        await pool.close()
    assert result.dead_letters == Counter({"unprocessable": 1, "invalid_json": 1})
    assert result.counts[(settings.topic_usage, "usage", "recorded")] == 3
    assert result.counts[(settings.topic_usage, "usage", "rejected")] == 1
    letter = (await fetch(settings, "SELECT * FROM dead_letters WHERE reason = 'unprocessable'"))[0]
    assert (letter["partition"], letter["offset"]) == (0, 2)
    assert letter["detail"] == "ZeroDivisionError: planted bug"
    entries = await fetch(
        settings, "SELECT reference, amount, balance_after FROM ledger_entries ORDER BY seq"
    )
    assert [(e["reference"], e["amount"], e["balance_after"]) for e in entries] == [
        ("g1", 100, 100),
        ("u1", -60, 40),
        ("u2", -40, 0),
        ("u2", -20, -20),
        ("u3", -5, -25),
    ]
    assert await fetchval(settings, "SELECT count(*) FROM usage_events") == 3
    alerts = await fetch(settings, "SELECT type FROM alerts ORDER BY ledger_seq")
    assert [a["type"] for a in alerts] == ["credit_balance_recovered", "credit_balance_depleted"]
    assert _sample(metrics, "chargeline_lane_isolations_total", topic=settings.topic_usage) == 1
    events_logged = [entry["event"] for entry in logs]
    assert "lane_apply_failed" in events_logged
    unprocessable = [entry for entry in logs if entry["event"] == "record_unprocessable"]
    assert [(e["partition"], e["offset"]) for e in unprocessable] == [(0, 2)]
    assert all(entry["log_level"] == "error" for entry in unprocessable)
    await assert_invariants(settings)


async def test_a_constraint_postgres_enforces_is_isolated_in_the_running_worker(
    settings: Settings,
) -> None:
    await setup_pipeline(settings, partitions=1, flows=[("flow_a", "active")])
    conn = await asyncpg.connect(settings.dsn)
    try:
        # A rule no validation knows of: Postgres refuses this one charge.
        await conn.execute(
            "ALTER TABLE charges ADD CONSTRAINT planted CHECK (reference <> 'poison-pg')"
        )
    finally:
        await conn.close()
    charges = [charge("flow_a", "c1", f"ok-{n}") for n in range(20)]
    charges.insert(7, charge("flow_a", "c1", "poison-pg"))
    async with running_worker(settings, "charges", "outbox") as process:
        await produce(settings, settings.topic_charges, [record(e) for e in charges])
        await wait_for(functools.partial(ingest_done, process, 21), what="21 records")
        await wait_for(functools.partial(outbox_empty, settings), what="dead letter published")
        metrics = process.metrics
        assert process.is_ready()
        # The lane keeps flowing after it.
        await produce(settings, settings.topic_charges, [record(charge("flow_a", "c2", "next"))])
        await wait_for(functools.partial(ingest_done, process, 22), what="the next record")
    dead = await fetch(settings, "SELECT reason, detail, record_value FROM dead_letters")
    assert len(dead) == 1
    assert dead[0]["reason"] == "unprocessable"
    assert dead[0]["detail"].startswith("CheckViolationError:")
    assert orjson.loads(dead[0]["record_value"])["reference"] == "poison-pg"
    assert await fetchval(settings, "SELECT count(*) FROM charges") == 21
    assert _sample(metrics, "chargeline_dead_letters_total", reason="unprocessable") == 1
    await assert_invariants(settings)
    assert await _committed_to_end(settings, settings.topic_charges)


async def test_a_lane_waiting_on_a_lock_is_reported_stalled_until_it_moves(
    settings: Settings,
) -> None:
    settings = settings.model_copy(update={"lane_stall_timeout_s": 1.0})
    await setup_pipeline(settings, partitions=1)
    async with running_worker(settings, "usage") as process:
        await produce(settings, settings.topic_usage, [record(grant("c1", "g1", 100))])
        await wait_for(functools.partial(ingest_done, process, 1), what="the grant")
        locker = await asyncpg.connect(settings.dsn)
        tx = locker.transaction()
        await tx.start()
        await locker.execute("SELECT * FROM customers WHERE customer_ref = 'c1' FOR UPDATE")
        with capture_logs() as logs:
            await produce(settings, settings.topic_usage, [record(usage("c1", "u1", 10))])
            ingest = process.ingest
            assert ingest is not None

            async def stalled() -> bool:
                return bool(ingest.stalled)

            await wait_for(stalled, timeout=30, what="the lane reported stalled")
            assert not process.is_ready()
            gauge = _sample(process.metrics, "chargeline_stalled_lanes", worker="usage")
            assert gauge == 1
            [report] = [entry for entry in logs if entry["event"] == "lane_stalled"]
            assert report["log_level"] == "error"
            assert report["oldest_offsets"] == {f"{settings.topic_usage}[0]": 1}
            await tx.rollback()
            await locker.close()

            async def moving() -> bool:
                return not ingest.stalled and process.is_ready()

            await wait_for(moving, timeout=30, what="the stall to be over")
            await wait_for(functools.partial(ingest_done, process, 2), what="the usage")
        assert _sample(process.metrics, "chargeline_stalled_lanes", worker="usage") == 0
    assert await fetchval(settings, "SELECT balance FROM customers WHERE customer_ref='c1'") == 90
