"""``chargeline replay`` and ``chargeline dlq replay``: re-process what is already on the
topics, safe by construction.

Topic replay reads a range of an input topic with a consumer of its own (no group, manual
assignment, nothing committed anywhere: the live group's offsets never move) and applies it
batch by batch through the live workers' ``BatchProcessor``, the same parse, dedupe, apply and
dead-letter path. Re-reading what was applied changes nothing, since every effect is keyed;
what was never applied is applied once. ``--dry-run`` runs the whole range in one transaction
and rolls it back, after reading what it changed.

Where a range ends:
- Log ends come from fetch responses (high watermark, or the last stable offset for this
  read-committed consumer), exact on every broker. ListOffsets is only a lower bound on some
  (TESTBED.md: the embedded Tansu broker answers with the last batch's base offset). The end
  is fixed when the replay starts, so records appended meanwhile are not chased forever.
- Times follow Kafka's definition, by record timestamp (when the record was published, not
  the event's ``occurred_at``): a range starts at the first record whose timestamp is at or
  after ``--since`` and ends before the first at or after ``--until``. The broker's
  ``offsets_for_times`` answer is used as a starting point and refined record by record,
  because some brokers answer with a batch's base offset.

Dead-letter replay re-publishes stored dead letters (original key, bytes and headers) to their
source topic and marks them replayed in the transaction that locked them: never twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import OffsetOutOfRangeError

from workers import db
from workers.app import build_handlers
from workers.errors import BrokerUnavailable, ChargelineError, UsageError
from workers.ingest.parse import Record
from workers.ingest.processor import BatchProcessor, BatchResult, Part
from workers.kafka import decode_headers, input_topics, make_producer, security_options
from workers.logs import get_logger
from workers.metrics import Metrics
from workers.retry import Stopping, retry_transient
from workers.settings import Settings

log = get_logger("chargeline.replay")

# How long a partition may go without delivering anything below its end before the replay
# gives up with an error (a broker that stopped answering); a re-run is always safe.
STALL_TIMEOUT_S = 60.0
FETCH_TIMEOUT_MS = 500
# Rows kept for the report's lists (counts are always complete).
LISTED_ROWS = 1000
# After five runs of a prepared statement Postgres may switch to a generic plan, which for
# the batch statements (unnest of parameter arrays joined to CTEs) is about 15 times slower
# (measured: record_charges, 5000 rows, 1.25 s instead of 0.08 s). Plans only; same SQL.
CUSTOM_PLANS = "SET LOCAL plan_cache_mode = force_custom_plan"

OUTCOME_FIELDS = {
    "recorded": "applied",
    "duplicate": "duplicates",
    "conflict": "conflicts",
    "invalid": "invalid",
    "rejected": "rejected",
}
DEAD_LETTER_OUTCOMES = ("conflict", "invalid", "rejected")

Progress = Callable[[int, int, "ReplayReport"], None]


class RangeError(UsageError):
    """The requested range does not fit the topic."""


# --- the range -------------------------------------------------------------------------------


@dataclass
class RangeSpec:
    """What the operator asked for. Start: ``since`` or ``from_offsets`` (only the partitions
    it names), else the beginning. End: ``until`` or ``to_offsets``, else the log end."""

    since: datetime | None = None
    until: datetime | None = None
    from_offsets: dict[int, int] | None = None
    to_offsets: dict[int, int] | None = None


@dataclass
class PartitionRange:
    """One partition's range, ``[start, end)``, narrowed while reading when times bound it."""

    partition: int
    start: int
    end: int
    since_ms: int | None = None  # not started until a record at or after this time
    until_ms: int | None = None  # the first record at or after this time ends the range
    read: int = 0
    skipped: int = 0  # before --since, where the broker's answer was coarse
    started: bool = False
    done: bool = False
    planned: tuple[int, int] = (0, 0)  # (start, end) when resolved, for progress
    position: int = 0  # next offset to look at

    def __post_init__(self) -> None:
        self.planned = (self.start, self.end)
        self.position = self.start
        if self.start >= self.end:
            self.finish()

    def accept(self, record: Record) -> bool | None:
        """True: in range; False: before it (skip); None: the range ended before it."""
        if record.offset >= self.end:
            self.finish()
            return None
        self.position = record.offset + 1
        if not self.started:
            if self.since_ms is not None and record.timestamp < self.since_ms:
                self.skipped += 1
                return False
            self.started = True
            self.start = record.offset
        if self.until_ms is not None and record.timestamp >= self.until_ms:
            self.end = record.offset
            self.finish()
            return None
        self.read += 1
        return True

    def finish(self) -> None:
        if not self.started:
            self.start = self.end  # nothing in range here
        self.done = True

    def progressed(self) -> int:
        first, last = self.planned
        return last - first if self.done else max(0, min(self.position, last) - first)

    def as_dict(self) -> dict[str, int]:
        return {
            "partition": self.partition,
            "start": self.start,
            "end": self.end,
            "read": self.read,
        }


def replay_consumer(settings: Settings) -> AIOKafkaConsumer:
    """A consumer without a group: manual assignment and seeks, never a commit."""
    max_bytes = max(settings.max_event_bytes * 4, 1 << 20)
    return AIOKafkaConsumer(
        group_id=None,
        client_id="chargeline-replay",
        enable_auto_commit=False,
        # A position that no longer exists (retention deleted it) must fail the replay, not
        # jump silently to another offset: that would drop or re-read records unannounced.
        auto_offset_reset="none",
        isolation_level="read_committed",
        max_poll_records=settings.batch_max_records,
        fetch_max_bytes=max(52_428_800, max_bytes),
        max_partition_fetch_bytes=max_bytes,
        **security_options(settings),
    )


async def log_ends(
    consumer: AIOKafkaConsumer, partitions: Sequence[TopicPartition], *, within_s: float = 30
) -> dict[TopicPartition, int]:
    """The exact end of each (assigned) partition's log, from fetch responses.

    ListOffsets ("latest") is a lower bound on some brokers, so fetch from there: every fetch
    response carries the partition's high watermark and last stable offset. Records fetched
    here are discarded; the caller seeks where it wants to read.
    """
    lower = await consumer.end_offsets(list(partitions))
    for tp in partitions:
        consumer.seek(tp, lower[tp])
    deadline = time.monotonic() + within_s
    while missing := [tp for tp in partitions if consumer.highwater(tp) is None]:
        if time.monotonic() > deadline:
            raise BrokerUnavailable(f"no fetch answer for {_names(missing)} in {within_s:.0f}s")
        await consumer.getmany(*missing, timeout_ms=200)
    ends = {}
    for tp in partitions:
        stable = consumer.last_stable_offset(tp)
        # A read-committed consumer reads up to the last stable offset, not beyond.
        ends[tp] = max(lower[tp], stable if stable is not None else consumer.highwater(tp))
    return ends


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    await consumer.topics()  # refreshes the cluster metadata
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        raise RangeError(f"topic {topic!r} does not exist or has no partitions")
    return [TopicPartition(topic, p) for p in sorted(partitions)]


async def resolve_ranges(
    consumer: AIOKafkaConsumer, topic: str, spec: RangeSpec
) -> list[PartitionRange]:
    """Assign the partitions to replay and return their ranges (nothing read yet)."""
    every = await topic_partitions(consumer, topic)
    known = {tp.partition for tp in every}
    for option, offsets in (
        ("--from-offsets", spec.from_offsets),
        ("--to-offsets", spec.to_offsets),
    ):
        unknown = sorted(set(offsets or ()) - known)
        if unknown:
            raise RangeError(
                f"{option}: {topic} has no partition {unknown[0]} (it has {len(known)})"
            )
    chosen = [tp for tp in every if spec.from_offsets is None or tp.partition in spec.from_offsets]
    if spec.to_offsets and spec.from_offsets is not None:
        outside = sorted(set(spec.to_offsets) - set(spec.from_offsets))
        if outside:
            raise RangeError(f"--to-offsets names partition {outside[0]}, not in --from-offsets")
    consumer.assign(chosen)
    firsts = await consumer.beginning_offsets(chosen)
    ends = await log_ends(consumer, chosen)
    starts = await _starts(consumer, chosen, spec, firsts, ends)
    since_ms = _ms(spec.since)
    until_ms = _ms(spec.until)
    ranges = []
    for tp in chosen:
        start, end = starts[tp], ends[tp]
        if spec.to_offsets and tp.partition in spec.to_offsets:
            end = spec.to_offsets[tp.partition]
            if end > ends[tp]:
                raise RangeError(
                    f"--to-offsets {tp.partition}:{end} is beyond the log end {ends[tp]}"
                )
            if end < start:
                raise RangeError(f"partition {tp.partition}: --to-offsets {end} < start {start}")
        ranges.append(
            PartitionRange(
                tp.partition,
                start,
                end,
                since_ms=since_ms if spec.from_offsets is None else None,
                until_ms=until_ms,
            )
        )
    return ranges


async def _starts(
    consumer: AIOKafkaConsumer,
    partitions: list[TopicPartition],
    spec: RangeSpec,
    firsts: dict[TopicPartition, int],
    ends: dict[TopicPartition, int],
) -> dict[TopicPartition, int]:
    if spec.from_offsets is not None:
        starts = {}
        for tp in partitions:
            offset = spec.from_offsets[tp.partition]
            if offset < firsts[tp]:
                raise RangeError(
                    f"partition {tp.partition}: offset {offset} is before the log start "
                    f"{firsts[tp]} (those records were deleted by retention)"
                )
            if offset > ends[tp]:
                raise RangeError(
                    f"partition {tp.partition}: offset {offset} is beyond the log end {ends[tp]}"
                )
            starts[tp] = offset
        return starts
    if spec.since is None:
        return dict(firsts)
    found = await consumer.offsets_for_times(dict.fromkeys(partitions, _ms(spec.since)))
    starts = {}
    for tp in partitions:
        answer = found.get(tp)
        if answer is None or answer.offset < 0 or answer.timestamp < 0:
            starts[tp] = ends[tp]  # no record at or after --since
        else:
            # A lower bound on some brokers; PartitionRange.accept skips what is before.
            starts[tp] = min(max(answer.offset, firsts[tp]), ends[tp])
    return starts


def _ms(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1000)


def _names(partitions: Sequence[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions)


async def read_range(
    consumer: AIOKafkaConsumer,
    topic: str,
    ranges: list[PartitionRange],
    *,
    max_records: int,
    stopping: asyncio.Event,
) -> AsyncGenerator[list[Record], None]:
    """Batches of the records in range, in offset order per partition, until every range
    is done (or ``stopping`` is set)."""
    by_tp = {TopicPartition(topic, r.partition): r for r in ranges}
    for tp, r in by_tp.items():
        consumer.seek(tp, r.start)
    active = await _retire(consumer, by_tp, set(by_tp))
    last_delivery = time.monotonic()
    while active and not stopping.is_set():
        try:
            fetched = await consumer.getmany(
                *active, timeout_ms=FETCH_TIMEOUT_MS, max_records=max_records
            )
        except OffsetOutOfRangeError as exc:
            raise ChargelineError(
                f"records of {topic} were deleted while the replay read them ({exc}); "
                "every batch before was applied: re-run from there"
            ) from exc
        batch: list[Record] = []
        for tp, records in fetched.items():
            for record in records:
                verdict = by_tp[tp].accept(record)
                if verdict is None:
                    break
                if verdict:
                    batch.append(record)
        active = await _retire(consumer, by_tp, active)
        if fetched:
            last_delivery = time.monotonic()
        elif active and time.monotonic() - last_delivery > STALL_TIMEOUT_S:
            where = ", ".join(
                f"{tp.partition}@{by_tp[tp].position}/{by_tp[tp].end}"
                for tp in sorted(active, key=lambda tp: tp.partition)
            )
            raise BrokerUnavailable(
                f"no records from {topic} for {STALL_TIMEOUT_S:.0f}s with partitions short "
                f"of their end (partition@position/end: {where}); a re-run is safe"
            )
        if batch:
            yield batch


async def _retire(
    consumer: AIOKafkaConsumer,
    by_tp: dict[TopicPartition, PartitionRange],
    active: set[TopicPartition],
) -> set[TopicPartition]:
    """Pause the partitions whose range is done; return those still to read."""
    still = set()
    for tp in active:
        r = by_tp[tp]
        # The position also moves past records a read-committed consumer never returns
        # (transaction markers, aborted records), so it, not the last record, ends a range.
        if not r.done and await consumer.position(tp) >= r.end:
            r.position = r.end
            r.finish()
        if r.done:
            consumer.pause(tp)
        else:
            still.add(tp)
    return still


# --- what a replay changed ---------------------------------------------------------------------


@dataclass
class Changes:
    """What a replay's transactions wrote, read inside them before commit or rollback."""

    charges: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # -> [count, amount]
    # customer -> [before, after, change]. `change` is what this replay's entries add up to:
    # live workers may move a balance between two batches of a real run.
    balances: dict[str, list[int]] = field(default_factory=dict)
    alert_counts: Counter[str] = field(default_factory=Counter)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    reload_requests: list[dict[str, Any]] = field(default_factory=list)
    reload_request_count: int = 0

    def add(self, other: Changes) -> None:
        for key, (count, amount) in other.charges.items():
            total = self.charges.setdefault(key, [0, 0])
            total[0] += count
            total[1] += amount
        for customer, (before, after, change) in other.balances.items():
            # Batches are applied in order: the first before, the last after.
            total = self.balances.setdefault(customer, [before, after, 0])
            total[1] = after
            total[2] += change
        self.alert_counts.update(other.alert_counts)
        self.alerts += other.alerts[: max(0, LISTED_ROWS - len(self.alerts))]
        self.reload_request_count += other.reload_request_count
        self.reload_requests += other.reload_requests[
            : max(0, LISTED_ROWS - len(self.reload_requests))
        ]

    def new_charge_count(self) -> int:
        return sum(count for count, _ in self.charges.values())

    def as_dict(self, *, show: int) -> dict[str, Any]:
        changed = sorted(
            (customer, before, after, change)
            for customer, (before, after, change) in self.balances.items()
            if change
        )
        return {
            "new_charges": [
                {"flow_id": flow, "currency": currency, "count": count, "amount": amount}
                for (flow, currency), (count, amount) in sorted(self.charges.items())
            ],
            "customers_changed": len(changed),
            "balance_changes": [
                {"customer_ref": c, "before": b, "after": a, "change": d}
                for c, b, a, d in changed[:show]
            ],
            "alerts_by_type": dict(sorted(self.alert_counts.items())),
            "alerts": sorted(self.alerts, key=_alert_order)[:show],
            "reload_requests": self.reload_request_count,
        }


def _alert_order(alert: dict[str, Any]) -> tuple[str, int, str]:
    return (alert["customer_ref"], alert.get("ledger_seq") or 0, alert["type"])


async def read_changes(conn: Any, customers: Sequence[str]) -> Changes:
    """What the open transaction on ``conn`` wrote (see workers/sql/replay.sql)."""
    changes = Changes()
    for row in await conn.fetch(db.QUERIES["replay_new_charges"]):
        changes.charges[(row["flow_id"], row["currency"])] = [row["count"], row["amount"]]
    if not customers:
        return changes
    refs = list(customers)
    for row in await conn.fetch(db.QUERIES["replay_balance_changes"], refs):
        before, after = row["before"], row["after"]
        changes.balances[row["customer_ref"]] = [before, after, after - before]
    for row in await conn.fetch(db.QUERIES["replay_new_alerts"], refs):
        changes.alert_counts[row["type"]] += 1
        if len(changes.alerts) < LISTED_ROWS:
            changes.alerts.append(dict(row.items()))
    if await conn.fetchval(db.QUERIES["replay_has_reload_requests"]):
        rows = await conn.fetch(db.QUERIES["replay_new_reload_requests"], refs)
        changes.reload_request_count = len(rows)
        changes.reload_requests = [dict(row.items()) for row in rows[:LISTED_ROWS]]
    return changes


# --- the replay --------------------------------------------------------------------------------


@dataclass
class ReplayReport:
    """Counts by outcome (SPEC.md section 8) and what changed."""

    topic: str
    dry_run: bool
    partitions: list[PartitionRange] = field(default_factory=list)
    result: BatchResult = field(default_factory=BatchResult)
    changes: Changes = field(default_factory=Changes)
    complete: bool = False
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def outcomes(self) -> Counter[str]:
        return self.result.outcome_totals()

    @property
    def new_dead_letters(self) -> int:
        return sum(self.result.dead_letters.values())

    def as_dict(self, *, show: int = 100) -> dict[str, Any]:
        totals = self.outcomes()
        by_type: dict[str, dict[str, int]] = {}
        for (_topic, event_type, outcome), n in sorted(self.result.counts.items()):
            row = by_type.setdefault(
                event_type, {"read": 0, **dict.fromkeys(OUTCOME_FIELDS.values(), 0)}
            )
            row["read"] += n
            row[OUTCOME_FIELDS.get(outcome, outcome)] += n
        dead_path = sum(totals[outcome] for outcome in DEAD_LETTER_OUTCOMES)
        return {
            "topic": self.topic,
            "dry_run": self.dry_run,
            "complete": self.complete,
            "read": self.result.records,
            **{name: totals[outcome] for outcome, name in OUTCOME_FIELDS.items()},
            "dead_letters": self.new_dead_letters,
            # Rejections whose source position was dead-lettered before: nothing new.
            "already_dead_lettered": dead_path - self.new_dead_letters,
            "by_type": by_type,
            "dead_letters_by_reason": dict(sorted(self.result.dead_letters.items())),
            "changes": self.changes.as_dict(show=show),
            "partitions": [r.as_dict() for r in self.partitions],
            "seconds": round(self.seconds, 3),
            "warnings": self.warnings,
        }


def handler_kind(settings: Settings, topic: str) -> str:
    for kind, name in input_topics(settings).items():
        if topic == name:
            return kind
    names = ", ".join(input_topics(settings).values())
    raise UsageError(f"{topic!r} is not an input topic; expected one of: {names}")


async def run_replay(
    settings: Settings,
    topic: str,
    spec: RangeSpec,
    *,
    dry_run: bool = False,
    progress: Progress | None = None,
    stopping: asyncio.Event | None = None,
) -> ReplayReport:
    """Re-process a range of ``topic`` through the live apply path; see the module docstring."""
    if spec.since and spec.until and spec.since >= spec.until:
        raise UsageError("--since must be before --until")
    stopping = stopping or asyncio.Event()
    metrics = Metrics()
    processor = BatchProcessor(
        settings,
        build_handlers(settings, [handler_kind(settings, topic)]),
        metrics,
        probe_first=True,  # a replayed range is mostly recorded already
    )
    report = ReplayReport(topic=topic, dry_run=dry_run)
    started = time.monotonic()
    consumer = replay_consumer(settings)
    await consumer.start()
    try:
        report.partitions = await resolve_ranges(consumer, topic, spec)
        total = sum(r.end - r.start for r in report.partitions)
        log.info("replay_started", topic=topic, dry_run=dry_run, records=total,
                 partitions=[r.as_dict() for r in report.partitions])  # fmt: skip
        batches = read_range(
            consumer,
            topic,
            report.partitions,
            max_records=settings.batch_max_records,
            stopping=stopping,
        )
        apply = _DryRun(processor) if dry_run else _RealRun(processor, settings, metrics, stopping)
        interrupted = False
        async with apply, contextlib.aclosing(batches):
            async for batch in batches:
                try:
                    result = await apply.batch(batch)
                except Stopping:
                    # Asked to stop while Postgres was failing: this batch was not applied.
                    report.warnings.append(
                        f"stopped with a batch of {len(batch)} records not applied "
                        "(Postgres was unavailable)"
                    )
                    interrupted = True
                    break
                result.records = len(batch)
                report.result.add(result)
                if progress is not None:
                    progress(sum(r.progressed() for r in report.partitions), total, report)
            report.changes = await apply.changes()
        report.complete = not interrupted and all(r.done for r in report.partitions)
    finally:
        await consumer.stop()
        report.seconds = time.monotonic() - started
    recorded_charges = sum(
        n
        for (_, t, outcome), n in report.result.counts.items()
        if (t, outcome) == ("charge", "recorded")
    )
    if report.changes.new_charge_count() != recorded_charges:
        report.warnings.append(
            f"the change summary found {report.changes.new_charge_count()} new charges where "
            f"{recorded_charges} were recorded; the summary is incomplete"
        )
    log.info("replay_finished", **{k: v for k, v in report.as_dict().items() if isinstance(v, int)})
    return report


def _customers(parts: list[Part]) -> set[str]:
    return {parsed.event.customer_ref for part in parts for parsed in part.parsed}


class _DryRun:
    """Every batch in one transaction on one connection, rolled back at the end.

    It holds what the live apply path locks (customer rows, flows, new dedup keys) until it
    ends: live batches for the same customers wait for it.
    """

    def __init__(self, processor: BatchProcessor) -> None:
        self.processor = processor
        self.customers: set[str] = set()
        self.conn: asyncpg.Connection | None = None
        self.tx: Any = None

    async def __aenter__(self) -> _DryRun:
        self.conn = await asyncpg.connect(self.processor.settings.dsn, timeout=10)
        self.tx = self.conn.transaction()
        await self.tx.start()
        await self.conn.execute(CUSTOM_PLANS)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.conn is not None
        try:
            if not self.conn.is_closed():
                await self.tx.rollback()
        finally:
            await self.conn.close()

    async def batch(self, records: list[Record]) -> BatchResult:
        prepared = self.processor.prepare(records)
        result = await self.processor.apply(self.conn, prepared)
        self.customers |= _customers(prepared)  # once applied: a probed part is parsed then
        return result

    async def changes(self) -> Changes:
        return await read_changes(self.conn, sorted(self.customers))


class _RealRun:
    """One transaction per batch, retried as a whole on outages, like the live loop's
    ``BatchProcessor.process``; the change summary is read inside it before commit."""

    def __init__(
        self,
        processor: BatchProcessor,
        settings: Settings,
        metrics: Metrics,
        stopping: asyncio.Event,
    ) -> None:
        self.processor = processor
        self.settings = settings
        self.metrics = metrics
        self.stopping = stopping
        self.pool: Any = None
        self.total = Changes()

    async def __aenter__(self) -> _RealRun:
        self.pool = await db.create_pool(self.settings.dsn, min_size=1, max_size=2)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.pool is not None:
            await self.pool.close()

    async def batch(self, records: list[Record]) -> BatchResult:
        prepared = self.processor.prepare(records)

        async def attempt() -> tuple[BatchResult, Changes]:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(CUSTOM_PLANS)
                result = await self.processor.apply(conn, prepared)
                # Read once applied: a probed part is parsed then.
                customers = sorted(_customers(prepared))
                return result, await read_changes(conn, customers)

        result, changes = await retry_transient(
            attempt,
            is_transient=db.is_transient,
            component="postgres",
            settings=self.settings,
            metrics=self.metrics,
            stopping=self.stopping,
        )
        self.total.add(changes)
        return result

    async def changes(self) -> Changes:
        return self.total


# --- dead-letter replay ---------------------------------------------------------------------------

# Reasons a second attempt can clear: the flow was resumed or created, the grant arrived,
# the bug that made a record unprocessable was fixed. The others (malformed, conflicting,
# too large) would only come back as new dead letters.
RETRYABLE_REASONS = ("flow_paused", "unknown_flow", "unknown_grant", "unprocessable")
REPLAYED_FROM_HEADER = "chargeline.replayed-from"
DLQ_PAGE = 500


@dataclass
class DeadLetterReplayReport:
    dry_run: bool
    reasons: list[str] | None
    replayed: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    by_topic: Counter[str] = field(default_factory=Counter)
    replayed_ids: list[int] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    not_found: list[int] = field(default_factory=list)
    already_replayed: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "reasons": self.reasons,
            "replayed": self.replayed,
            "by_reason": dict(sorted(self.by_reason.items())),
            "by_topic": dict(sorted(self.by_topic.items())),
            "ids": self.replayed_ids[:LISTED_ROWS],
            "skipped": self.skipped[:LISTED_ROWS],
            "not_found": self.not_found,
            "already_replayed": self.already_replayed,
        }


async def replay_dead_letters(
    settings: Settings,
    *,
    reasons: list[str] | None = None,
    ids: list[int] | None = None,
    since: datetime | None = None,
    dry_run: bool = False,
    page_size: int = DLQ_PAGE,
) -> DeadLetterReplayReport:
    """Re-publish dead letters not yet replayed to their source topic; mark them replayed.

    Per page, in one transaction: lock the rows (SKIP LOCKED), publish them with acks from all
    replicas, mark them, commit. A crash between the acks and the commit leaves them unmarked
    and a re-run publishes them again: the input's dedup makes that second copy a duplicate.
    Without ``reasons`` or ``ids`` only ``RETRYABLE_REASONS`` are taken. A charge whose flow
    is still paused or unknown is skipped and stays unreplayed, for a run after the fix.
    """
    if reasons is None and ids is None:
        reasons = list(RETRYABLE_REASONS)
    report = DeadLetterReplayReport(dry_run=dry_run, reasons=reasons)
    topics = set(input_topics(settings).values())
    conn: asyncpg.Connection = await asyncpg.connect(settings.dsn, timeout=10)
    producer = None if dry_run else make_producer(settings, client_id="chargeline-dlq-replay")
    try:
        if ids is not None:
            rows = await conn.fetch(db.QUERIES["dead_letters_by_id"], ids)
            found = {row["id"]: row["replayed_at"] for row in rows}
            report.not_found = sorted(set(ids) - set(found))
            report.already_replayed = sorted(i for i, at in found.items() if at is not None)
        if producer is not None:
            await producer.start()
        last_id = 0
        while True:
            # The page's rows stay locked until this transaction ends; a dry run writes
            # nothing, so committing it only releases them.
            async with conn.transaction():
                rows = await conn.fetch(
                    db.QUERIES["dead_letters_to_replay"], last_id, reasons, ids, since, page_size
                )
                if not rows:
                    break
                last_id = rows[-1]["id"]
                sendable = await _sendable(conn, rows, settings, topics, report)
                if producer is not None and sendable:
                    futures = [
                        await producer.send(
                            row["topic"],
                            key=_bytes(row["record_key"]),
                            value=_bytes(row["record_value"]),
                            headers=_replay_headers(row),
                        )
                        for row in sendable
                    ]
                    await asyncio.gather(*futures)
                    ids_sent = [row["id"] for row in sendable]
                    await conn.execute(db.QUERIES["dead_letters_mark_replayed"], ids_sent)
            for row in sendable:
                report.replayed += 1
                report.by_reason[row["reason"]] += 1
                report.by_topic[row["topic"]] += 1
                report.replayed_ids.append(row["id"])
    finally:
        if producer is not None:
            await producer.stop()
        await conn.close()
    log.info("dead_letters_replayed", replayed=report.replayed, dry_run=dry_run,
             by_reason=dict(report.by_reason), skipped=len(report.skipped))  # fmt: skip
    return report


async def _sendable(
    conn: Any,
    rows: list[Any],
    settings: Settings,
    topics: set[str],
    report: DeadLetterReplayReport,
) -> list[Any]:
    """The rows worth publishing now; the others are noted in ``report.skipped``."""
    flows: dict[int, str] = {}
    for row in rows:
        if row["topic"] == settings.topic_charges and row["reason"] in (
            "flow_paused",
            "unknown_flow",
        ):
            flow_id = _flow_id(row["record_value"])
            if flow_id is not None:
                flows[row["id"]] = flow_id
    statuses = {
        r["flow_id"]: r["status"]
        for r in await conn.fetch(db.QUERIES["flow_statuses"], sorted(set(flows.values())))
    } if flows else {}  # fmt: skip
    sendable = []
    for row in rows:
        why = None
        if row["topic"] not in topics:
            why = f"{row['topic']} is not an input topic here"
        elif row["id"] in flows:
            status = statuses.get(flows[row["id"]])
            if status != "active":
                why = f"flow {flows[row['id']]!r} is {status or 'unknown'}"
        if why is None:
            sendable.append(row)
        else:
            report.skipped.append({"id": row["id"], "reason": row["reason"], "why": why})
    return sendable


def _flow_id(value: Any) -> str | None:
    try:
        event = orjson.loads(bytes(value))
    except (orjson.JSONDecodeError, TypeError):
        return None
    flow_id = event.get("flow_id") if isinstance(event, dict) else None
    return flow_id if isinstance(flow_id, str) else None


def _bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


def _replay_headers(row: Any) -> list[tuple[str, bytes]]:
    headers = [
        (k, v) for k, v in decode_headers(row["record_headers"]) if k != REPLAYED_FROM_HEADER
    ]
    return [*headers, (REPLAYED_FROM_HEADER, str(row["id"]).encode())]
