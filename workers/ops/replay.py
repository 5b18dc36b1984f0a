"""``chargeline replay``: re-process what is already on an input topic, safe by construction.

A range of the topic (``workers.ops.topic_ranges``) is read with a consumer of its own (no
group, manual assignment, nothing committed anywhere: the live group's offsets never move)
and applied batch by batch through the live workers' ``BatchProcessor``, the same parse,
dedupe, apply and dead-letter path. Re-reading what was applied changes nothing, since every
effect is keyed; what was never applied is applied once. ``--dry-run`` runs the whole range in
one transaction and rolls it back, after reading what it changed; a real run reads what each
batch changed inside that batch's transaction, before it commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from workers import db
from workers.app import build_handlers
from workers.errors import ChargelineError, UsageError
from workers.ingest.parse import Record, describe_exception
from workers.ingest.processor import (
    BatchProcessor,
    BatchResult,
    Part,
    is_record_fault,
    partition_spans,
)
from workers.kafka import input_topics
from workers.logs import get_logger
from workers.metrics import Metrics
from workers.ops.topic_ranges import (
    PartitionRange,
    RangeSpec,
    read_range,
    replay_consumer,
    resolve_ranges,
)
from workers.retry import Stopping, retry_transient
from workers.settings import Settings

log = get_logger("chargeline.replay")

# Rows kept for the report's lists (counts are always complete).
LISTED_ROWS = 1000

OUTCOME_FIELDS = {
    "recorded": "applied",
    "duplicate": "duplicates",
    "conflict": "conflicts",
    "invalid": "invalid",
    "rejected": "rejected",
}
DEAD_LETTER_OUTCOMES = ("conflict", "invalid", "rejected")

Progress = Callable[[int, int, "ReplayReport"], None]


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


async def read_changes(conn: db.Connection, customers: Sequence[str]) -> Changes:
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
    if spec.since and spec.until and spec.since > spec.until:  # equal: an empty range
        raise UsageError("--since must not be after --until")
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
    try:
        await consumer.start()  # in the try: a client that failed to start is stopped too
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
            report.warnings += [
                f"{failed}: applied lane by lane, the records to blame dead-lettered "
                "unprocessable; its changes are not listed"
                for failed in (apply.failed if isinstance(apply, _RealRun) else ())
            ]
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


class ReplayError(ChargelineError):
    """The replay could not go on."""


def _failed_batch(records: list[Record], exc: BaseException) -> str:
    spans = partition_spans(records)
    where = ", ".join(f"{t}[{p}] {lo}-{hi}" for (t, p), (lo, hi) in sorted(spans.items()))
    return f"a batch ({where}) failed on its records ({describe_exception(exc)})"


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
        self.conn: db.Connection | None = None
        self.tx: db.Transaction | None = None

    async def __aenter__(self) -> _DryRun:
        self.conn = await db.connect(self.processor.settings.dsn)
        self.tx = self.conn.transaction()
        await self.tx.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.conn is not None
        assert self.tx is not None
        try:
            if not self.conn.is_closed():
                await self.tx.rollback()
        finally:
            await self.conn.close()

    async def batch(self, records: list[Record]) -> BatchResult:
        assert self.conn is not None
        prepared = self.processor.prepare(records)
        try:
            result = await self.processor.apply(self.conn, prepared)
        except Exception as exc:
            if not is_record_fault(exc):
                raise
            # The one transaction is aborted, and a savepoint would hide this transaction's
            # rows from the change report (it finds them by their xmin): stop here.
            raise ReplayError(
                f"dry run stopped: {_failed_batch(records, exc)}; a real run dead-letters "
                "the records to blame unprocessable and applies the others"
            ) from None
        self.customers |= _customers(prepared)  # once applied: a probed part is parsed then
        return result

    async def changes(self) -> Changes:
        assert self.conn is not None
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
        self.pool: db.Pool | None = None
        self.total = Changes()
        self.failed: list[str] = []  # batches applied lane by lane, described

    async def __aenter__(self) -> _RealRun:
        self.pool = await db.create_pool(self.settings.dsn, min_size=1, max_size=2)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.pool is not None:
            await self.pool.close()

    async def batch(self, records: list[Record]) -> BatchResult:
        pool = self.pool
        assert pool is not None
        prepared = self.processor.prepare(records)

        async def attempt() -> tuple[BatchResult, Changes]:
            async with pool.acquire() as conn, conn.transaction():
                result = await self.processor.apply(conn, prepared)
                # Read once applied: a probed part is parsed then.
                customers = sorted(_customers(prepared))
                return result, await read_changes(conn, customers)

        try:
            result, changes = await retry_transient(
                attempt,
                is_transient=db.is_transient,
                component="postgres",
                settings=self.settings,
                metrics=self.metrics,
                stopping=self.stopping,
            )
        except Exception as exc:
            if not is_record_fault(exc):
                raise
            # Apply it as the live workers do, lane by lane, the records to blame isolated
            # and dead-lettered unprocessable; its changes are then not itemised.
            self.failed.append(_failed_batch(records, exc))
            result = BatchResult()
            for part in prepared:
                result.add(await self.processor.transact(pool, part, stopping=self.stopping))
            return result
        self.total.add(changes)
        return result

    async def changes(self) -> Changes:
        return self.total
