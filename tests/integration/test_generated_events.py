"""Generated input through the real parse-and-apply path, on a real Postgres.

Events generated from the published JSON Schema files (hypothesis-jsonschema, from
``tests/strategies.py``), most of them keyed by their customer_ref, made to
meet each other (a few customers, references and grant references per example, and the
flows of the database, one active and one paused, as flow_id), and mutated out of the schema
(fields set to odd values, removed or added), or not events at all (broken JSON, bytes that
are not UTF-8, tombstones, values beyond the size limit), in Kafka-like records with odd
keys, topics, timestamps and headers now and then, and sometimes sent twice. Each batch goes
through ``BatchProcessor`` with the charges and usage handlers, as ``chargeline worker``
builds it: ``prepare``, then ``transact`` for each part.

Property, for every batch: nothing raises; every record is either applied (a row at its
source position in charges, usage_events, grants or credit_voids), a duplicate of an event
already applied, or dead-lettered exactly once at its position with a known reason
(``DEAD_LETTER_REASONS``), and never ``unprocessable`` (the apply step raised on it); the
outcome counts cover each record once; a batch delivered again changes no row count; and
``chargeline verify``'s invariants hold.

CHARGELINE_DEEP_TESTS=1 runs twenty times as many examples.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from schemas.common import DEAD_LETTER_REASONS
from schemas.events import EventRejected, parse_event
from tests.strategies import GENERATED, ODD_FOR_FIELD, dumps, json_values, odd_values
from tests.support import assert_invariants
from workers import db
from workers.app import build_handlers
from workers.ingest.parse import BareRecord
from workers.ingest.processor import BatchProcessor, BatchResult
from workers.metrics import Metrics
from workers.settings import Settings

DEEP = os.environ.get("CHARGELINE_DEEP_TESTS") == "1"
EXAMPLES = 40 * (20 if DEEP else 1)
PARTITIONS = 3
FLOWS = {"flow_on": "active", "flow_off": "paused"}
# The last millisecond a datetime holds is 253402300799999: these are past it, or before 1970.
ODD_TIMESTAMPS = [-1, -5, 0, 253_402_300_800_000, 2**63 - 1]
Position = tuple[str, int, int]  # (topic, partition, offset) of a record
APPLIED_TABLES = ("charges", "usage_events", "grants", "credit_voids")
COUNTED_TABLES = (*APPLIED_TABLES, "dead_letters", "conflicts")


@dataclass(frozen=True)
class Planned:
    """One record of a batch, before it gets its topic name and offset."""

    on_usage_topic: bool
    partition: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None  # None: now
    headers: tuple[tuple[str, bytes | None], ...] = ()


# --- Generation --------------------------------------------------------------------------------

CUSTOMERS = ("c0", "c1", "c2")
REFERENCES = ("r0", "r1", "r2")


def _recent(draw: st.DrawFn, *, days: tuple[int, int]) -> str:
    """An RFC 3339 instant some ``days`` (a range, negative: ago) from now."""
    moment = datetime.now(UTC) + timedelta(days=draw(st.integers(*days)))
    return moment.isoformat().replace("+00:00", "Z")


def _meet(event: dict[str, Any], draw: st.DrawFn) -> dict[str, Any]:
    """``event`` with its identifiers mostly drawn from the example's few, so that events
    meet (a customer's grants pay its usage, voids find grants, references repeat), and
    its times mostly near now, so that grants are in force and occurred_at is not ahead:
    the schema's calendar spans years 1 to 9999."""
    if "customer_ref" in event and draw(st.integers(0, 9)) < 8:
        event["customer_ref"] = draw(st.sampled_from(CUSTOMERS))
    if "reference" in event and draw(st.integers(0, 9)) < 7:
        event["reference"] = draw(st.sampled_from(REFERENCES))
    if "grant_reference" in event and draw(st.integers(0, 9)) < 8:
        event["grant_reference"] = draw(st.sampled_from(REFERENCES))
    if "flow_id" in event and draw(st.integers(0, 9)) < 8:
        event["flow_id"] = draw(st.sampled_from(sorted(FLOWS)))
    if "occurred_at" in event and draw(st.integers(0, 9)) < 7:
        event["occurred_at"] = _recent(draw, days=(-30, 0))
    if "expires_at" in event and draw(st.integers(0, 9)) < 7:
        event["expires_at"] = _recent(draw, days=(1, 400))
    if "effective_at" in event and draw(st.integers(0, 9)) < 7:
        event["effective_at"] = _recent(draw, days=(-30, 0))
    return event


def _mutate(event: dict[str, Any], draw: st.DrawFn) -> dict[str, Any]:
    action = draw(st.sampled_from(["set", "set", "remove", "add"]))
    if action == "remove" and event:
        del event[draw(st.sampled_from(sorted(event)))]
    elif action == "add":
        event[draw(st.text(max_size=8))] = draw(json_values)
    else:
        name = draw(st.sampled_from(sorted(event) or ["type"]))
        event[name] = draw(ODD_FOR_FIELD.get(name, odd_values))
    return event


@st.composite
def values(draw: st.DrawFn, event: dict[str, Any]) -> bytes | None:
    """The record value for ``event``: its JSON, or bytes that are no event at all."""
    raw = dumps(event, ascii_only=draw(st.booleans()))
    shape = draw(st.sampled_from(["json"] * 25 + ["cut", "not utf-8", "trailing", "huge", "none"]))
    if shape == "cut":
        return raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    if shape == "not utf-8":
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])) + raw[at:]
    if shape == "trailing":
        return raw + draw(st.sampled_from([b"}", b" x", b"\x00", b"\n\n"]))
    if shape == "huge":
        return dumps({**event, "metadata": {"pad": "x" * 70_000}})
    if shape == "none":
        return None
    return raw


@st.composite
def planned_records(draw: st.DrawFn, sent: list[Planned]) -> Planned:
    if sent and draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from(sent))  # the very same record again: a duplicate
    event = _meet(dict(draw(GENERATED["input_event.schema.json"], label="event")), draw)
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 0, 0, 1, 2]))):
        event = _mutate(event, draw)
    customer_ref = event.get("customer_ref")
    key: bytes | None = customer_ref.encode() if isinstance(customer_ref, str) else None
    if draw(st.integers(0, 9)) == 0:
        key = draw(st.sampled_from([None, b"", b"c1", b"\xff", key or b"c0"]))
    on_usage_topic = event.get("type") != "charge"
    if draw(st.integers(0, 19)) == 0:
        on_usage_topic = not on_usage_topic
    timestamp: int | None = None
    if draw(st.integers(0, 9)) == 0:
        timestamp = draw(st.sampled_from(ODD_TIMESTAMPS) | st.integers(-(2**63), 2**63 - 1))
    headers: tuple[tuple[str, bytes | None], ...] = ()
    if draw(st.integers(0, 9)) == 0:
        headers = (("trace", b"t1"), ("empty", None), ("chargeline.reason", b"spoofed"))
    # As Kafka's default partitioner does, one partition per key; now and then another.
    partition = zlib.crc32(key or b"") % PARTITIONS
    if draw(st.integers(0, 9)) == 0:
        partition = draw(st.integers(0, PARTITIONS - 1))
    return Planned(
        on_usage_topic,
        partition,
        key,
        draw(values(event)),
        timestamp,
        headers,
    )


Batch = tuple[list[Planned], bool]  # the records, and whether to deliver them again


@st.composite
def runs(draw: st.DrawFn) -> list[Batch]:
    """One to three batches of records about the same customers."""
    sent: list[Planned] = []
    batches: list[Batch] = []
    for _ in range(draw(st.integers(1, 3))):
        records: list[Planned] = []
        for _ in range(draw(st.integers(1, 12))):
            records.append(draw(planned_records(sent)))
            sent.append(records[-1])
        batches.append((records, draw(st.integers(0, 3)) == 0))
    return batches


# --- The harness -------------------------------------------------------------------------------


@dataclass
class Harness:
    """One database for the whole test; each example has a processor of its own (a fresh
    worker: lane modes depend on what a lane has seen), identifiers of its own (a prefix),
    and each record a source position of its own."""

    settings: Settings
    pool: asyncpg.Pool
    processor: BatchProcessor
    offsets: Counter[tuple[str, int]] = field(default_factory=Counter)
    examples: int = 0
    fates: Counter[str] = field(default_factory=Counter)  # of every record fed, for -s runs

    @classmethod
    async def open(cls, settings: Settings) -> Harness:
        pool = await db.create_pool(settings.dsn)
        async with pool.acquire() as conn:
            for flow_id, status in FLOWS.items():
                await conn.execute(db.QUERIES["flow_create"], flow_id, flow_id, "payee")
                await conn.execute(db.QUERIES["flow_set_status"], flow_id, status)
        return cls(settings, pool, _processor(settings))

    def start_example(self) -> None:
        self.examples += 1
        self.processor = _processor(self.settings)

    def records(self, planned: Sequence[Planned]) -> list[BareRecord]:
        """Kafka-like records, with this example's prefix on the customer and reference
        pools (so examples never meet) and positions of their own."""
        prefix = f"x{self.examples}-"
        now_ms = int(time.time() * 1000)
        records = []
        for plan in planned:
            topic = (
                self.settings.topic_usage if plan.on_usage_topic else self.settings.topic_charges
            )
            position = (topic, plan.partition)
            offset = self.offsets[position]
            self.offsets[position] += 1
            records.append(
                BareRecord(
                    topic,
                    plan.partition,
                    offset,
                    _prefixed(plan.key, prefix),
                    _prefixed(plan.value, prefix),
                    now_ms - 20 if plan.timestamp_ms is None else plan.timestamp_ms,
                    plan.headers,
                )
            )
        return records

    async def deliver(self, records: Sequence[BareRecord]) -> BatchResult:
        """One batch, as the consumer loop hands it over: prepared, then each part applied
        in a transaction of its own."""
        result = BatchResult(records=len(records))
        for part in self.processor.prepare(records):
            result.add(await self.processor.transact(self.pool, part))
        return result

    async def row_counts(self) -> dict[str, int]:
        async with self.pool.acquire() as conn:
            return {
                table: int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
                for table in COUNTED_TABLES
            }

    async def outcomes(self, records: Sequence[BareRecord]) -> dict[Position, list[str]]:
        """What became of each record, by source position: "applied" (a row at its
        position) and the reason of its dead letter, if any."""
        wanted = {(r.topic, r.partition, r.offset): r.value for r in records}
        fates: dict[Position, list[str]] = {}
        async with self.pool.acquire() as conn:
            for table in APPLIED_TABLES:
                rows = await conn.fetch(
                    f"SELECT source_topic, source_partition, source_offset FROM {table}"
                )
                for row in rows:
                    if (position := (row[0], row[1], row[2])) in wanted:
                        fates.setdefault(position, []).append("applied")
            rows = await conn.fetch(
                'SELECT topic, partition, "offset", reason, detail FROM dead_letters'
            )
        for row in rows:
            if (position := (row[0], row[1], row[2])) in wanted:
                assert row[3] in DEAD_LETTER_REASONS, row[3]
                if row[3] == "unprocessable":
                    raise AssertionError(f"the apply step raised: {row[4]}")
                fates.setdefault(position, []).append(row[3])
        return {position: sorted(fate) for position, fate in fates.items()}


def _processor(settings: Settings) -> BatchProcessor:
    """The processor ``chargeline worker`` builds for the charges and usage topics."""
    return BatchProcessor(settings, build_handlers(settings, ["charges", "usage"]), Metrics())


def _prefixed(data: bytes | None, prefix: str) -> bytes | None:
    """``data`` with the example's prefix on every pooled customer and reference (quoted
    JSON strings, or a key that is one)."""
    if data is None:
        return None
    for name in (*CUSTOMERS, *REFERENCES):
        data = data.replace(f'"{name}"'.encode(), f'"{prefix}{name}"'.encode())
        if data == name.encode():
            data = f"{prefix}{name}".encode()
    return data


def _is_event(value: bytes | None) -> bool:
    if value is None:
        return False
    try:
        parse_event(value)
    except EventRejected:
        return False
    return True


async def check_run(harness: Harness, batches: list[Batch]) -> None:
    harness.start_example()
    for planned, again in batches:
        await check_batch(harness, planned, again)
    await assert_invariants(harness.settings)


async def check_batch(harness: Harness, planned: list[Planned], again: bool) -> None:
    records = harness.records(planned)
    result = await harness.deliver(records)
    fates = await harness.outcomes(records)
    assert all(len(fate) == 1 for fate in fates.values()), fates
    fate_of = Counter(fate[0] for fate in fates.values())
    neither = [r for r in records if (r.topic, r.partition, r.offset) not in fates]
    harness.fates.update({**fate_of, "duplicate": len(neither)})
    counts = result.outcome_totals()
    assert counts.total() == len(records), (counts, len(records))
    # Only a duplicate leaves no row of its own: an event, counted as one.
    assert counts["duplicate"] == len(neither), (counts, fates, neither)
    assert all(_is_event(r.value) for r in neither), neither
    assert counts["recorded"] == fate_of["applied"], (counts, fates)
    dead = fate_of - Counter({"applied": fate_of["applied"]})
    assert dead == result.dead_letters, (dead, result.dead_letters)
    assert dead.total() == counts["conflict"] + counts["rejected"] + counts["invalid"], counts
    if again:
        before = await harness.row_counts()
        again_result = await harness.deliver(records)
        assert again_result.outcome_totals().total() == len(records)
        after = await harness.row_counts()
        refates = await harness.outcomes(records)
        assert after == before, "a batch delivered again changed rows"
        assert refates == fates


# --- Tests -------------------------------------------------------------------------------------

# Kept whatever the search draws: a record of each kind in one batch, delivered twice.
EVERY_KIND: list[Batch] = [(
    [
        Planned(True, 0, b"c0", json.dumps({"type": "credit_grant", "customer_ref": "c0",
                "reference": "r0", "tokens": 10, "cost_basis": "0", "currency": "eur",
                "source": "plan"}).encode(), None),
        Planned(True, 1, b"c0", json.dumps({"type": "usage", "customer_ref": "c0",
                "reference": "r1", "tokens": 15}).encode(), None),
        Planned(True, 2, b"c0", json.dumps({"type": "credit_void", "customer_ref": "c0",
                "reference": "r2", "grant_reference": "r0", "reason": "refund"}).encode(), None),
        Planned(False, 0, b"c1", json.dumps({"type": "charge", "flow_id": "flow_on",
                "customer_ref": "c1", "reference": "r0", "amount": 5, "currency": "JPY"}).encode(),
                None),
        Planned(False, 0, b"c1", json.dumps({"type": "charge", "flow_id": "flow_off",
                "customer_ref": "c1", "reference": "r1", "amount": 5, "currency": "JPY"}).encode(),
                None),
        Planned(False, 1, b"c1", json.dumps({"type": "charge", "flow_id": "nowhere",
                "customer_ref": "c1", "reference": "r2", "amount": 5, "currency": "JPY"}).encode(),
                None),
        Planned(True, 0, b"c2", json.dumps({"type": "usage", "customer_ref": "c2",
                "reference": "r0", "tokens": 1}).encode(), -1),
        Planned(True, 0, b"c2", b'{"type": "usage", "customer_ref": "c2"', None),
        Planned(True, 1, None, None, None),
        Planned(True, 2, b"c9", json.dumps({"type": "usage", "customer_ref": "c2",
                "reference": "r1", "tokens": 1}).encode(), None, (("empty", None),)),
    ],
    True,
)]  # fmt: skip


# Shrinking a failure takes minutes: more than pytest's default timeout for a test.
@pytest.mark.timeout(3600 if DEEP else 900)
def test_generated_records_are_applied_or_dead_lettered(settings: Settings) -> None:
    # Synchronous, with a loop of its own: hypothesis runs each example as a plain call.
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        harness = runner.run(Harness.open(settings))
        try:

            @hypothesis_settings(
                max_examples=EXAMPLES,
                database=None,
                deadline=None,
                suppress_health_check=[
                    HealthCheck.too_slow,
                    HealthCheck.data_too_large,
                    HealthCheck.filter_too_much,
                ],
            )
            @given(run=runs())
            @example(run=EVERY_KIND)
            def check(run: list[Batch]) -> None:
                runner.run(check_run(harness, run))

            check()
            print(f"{harness.examples} runs, records by fate: {dict(harness.fates)}")
        finally:
            runner.run(harness.pool.close())


async def test_a_field_named_nul_is_an_invalid_event(settings: Settings) -> None:
    """Found by the search above: an unknown field named "\\u0000" once made the dead
    letter's insert fail (its detail names the field), so the lane was isolated and the
    record dead-lettered ``unprocessable`` rather than ``invalid_event``."""
    harness = await Harness.open(settings)
    try:
        value = b'{"type": "usage", "customer_ref": "c0", "reference": "r0", "tokens": 1, "\\u0000": null}'
        records = harness.records([Planned(True, 0, b"c0", value, None)])
        result = await harness.deliver(records)
        async with harness.pool.acquire() as conn:
            reason = await conn.fetchval("SELECT reason FROM dead_letters")
        assert reason == "invalid_event"
        assert result.dead_letters == {"invalid_event": 1}
    finally:
        await harness.pool.close()


async def test_a_void_before_its_grant_changes_nothing_when_delivered_again(
    settings: Settings,
) -> None:
    """Found by the search above: in one partition, a void of a grant that comes after it is
    dead-lettered unknown_grant and the grant recorded; when the batch is delivered again (a
    crash between the database commit and the offset commit), the void found the grant and
    was applied, at a position that already held its dead letter."""
    harness = await Harness.open(settings)
    try:
        void = {"type": "credit_void", "customer_ref": "c0", "reference": "v1",
                "grant_reference": "g1", "reason": "refund"}  # fmt: skip
        grant = {"type": "credit_grant", "customer_ref": "c0", "reference": "g1",
                 "tokens": 10, "cost_basis": "0", "currency": "USD", "source": "plan"}  # fmt: skip
        records = harness.records(
            [Planned(True, 0, b"c0", json.dumps(event).encode(), None) for event in (void, grant)]
        )
        first = await harness.deliver(records)
        assert first.dead_letters == {"unknown_grant": 1}
        before = await harness.row_counts()
        await harness.deliver(records)
        assert await harness.row_counts() == before
    finally:
        await harness.pool.close()
