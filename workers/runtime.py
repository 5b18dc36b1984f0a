"""The worker runtime every consuming worker shares: parse, dedupe, apply, emit, commit.

``BatchProcessor`` parses a batch of records into parts, one per lane, and applies a part in
a Postgres transaction (replay applies all parts in one). ``ConsumerLoop`` feeds it from a
consumer group through ``workers.pipeline`` and moves the group's offsets only after every
transaction of the batch has committed. Exactly-once *effect* comes from the pair: effects
are keyed by permanent dedup keys and dead letters by source position, so a batch delivered
twice (a crash between the database commit and the offset commit, a stale worker after a
rebalance) changes nothing the second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import asyncpg
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from workers import db, kafka
from workers.deadletters import record_dead_letters
from workers.dedupe import Outcome, Verdict, first_occurrences, judge
from workers.known import LaneModes, known_records, peek
from workers.lifecycle import WorkerLoop
from workers.logs import get_logger
from workers.metrics import Metrics
from workers.parse import (
    BareRecord,
    Parsed,
    Record,
    Rejected,
    describe_exception,
    parse_records,
    unprocessable,
)
from workers.pipeline import BatchPipeline, LaneBroken
from workers.retry import Stopping, retry_transient
from workers.settings import Settings

log = get_logger("chargeline.runtime")


class Handler(Protocol):
    """Applies the valid events of one topic inside the batch's transaction."""

    name: str
    topic: str
    accepted_types: frozenset[str]

    async def apply(self, conn: Any, events: list[Parsed], alerts: Counter[str]) -> list[Verdict]:
        """Apply the first occurrence of each dedup key; one verdict per event, in order.
        Count the alerts written (by type) into ``alerts``."""
        ...


@dataclass(slots=True)
class Part:
    """One lane's share of a batch, parsed: what one transaction applies.

    On a lane that probes for known records (``workers.known``) the records stay in
    ``unparsed`` until the transaction has looked them up; those known are counted in
    ``known`` by (topic, type), the others parsed. A retried transaction does not redo it.
    """

    lane: tuple[str, int]  # (topic, partition modulo batch_lanes)
    handler: Handler
    parsed: list[Parsed] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    unparsed: list[Record] | None = None
    known: Counter[tuple[str, str]] = field(default_factory=Counter)
    probed: bool = field(init=False, default=False)  # prepared with unparsed records

    def __post_init__(self) -> None:
        self.probed = self.unparsed is not None

    def records(self) -> list[Record]:
        """The part's records, parsed or not."""
        if self.unparsed is not None:
            return self.unparsed
        return [p.record for p in self.parsed] + [r.record for r in self.rejected]


@dataclass
class BatchResult:
    records: int = 0
    counts: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)
    alerts: Counter[str] = field(default_factory=Counter)
    known: int = 0  # duplicates recognised by digest, never parsed (workers.known)
    # Next offset to read per partition: what the consumer group may commit.
    next_offsets: dict[TopicPartition, int] = field(default_factory=dict)

    def add(self, other: BatchResult) -> None:
        self.records += other.records
        self.known += other.known
        self.counts.update(other.counts)
        self.dead_letters.update(other.dead_letters)
        self.alerts.update(other.alerts)
        self.next_offsets.update(other.next_offsets)

    def outcome_totals(self) -> Counter[str]:
        totals: Counter[str] = Counter()
        for (_topic, _type, outcome), n in self.counts.items():
            totals[outcome] += n
        return totals


class BatchProcessor:
    """One batch, one transaction: 1. parse, 2. dedupe, 3. apply, 4. dead-letter and emit;
    on a lane of mostly re-reads, 0. known records first (``workers.known``)."""

    def __init__(
        self,
        settings: Settings,
        handlers: Sequence[Handler],
        metrics: Metrics,
        *,
        probe_first: bool = False,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.handlers = {handler.topic: handler for handler in handlers}
        # probe_first: for replays, whose records are expected to be recorded already.
        self.lane_modes = LaneModes(probe_first=probe_first)

    @property
    def topics(self) -> list[str]:
        return list(self.handlers)

    def prepare(self, records: Sequence[Record]) -> list[Part]:
        """Parse per lane (a topic's partitions modulo ``batch_lanes``); pure CPU work done
        once, outside any retry."""
        lanes = self.settings.batch_lanes
        by_lane: dict[tuple[str, int], list[Record]] = {}
        for record in records:
            by_lane.setdefault((record.topic, record.partition % lanes), []).append(record)
        parts = []
        for lane, lane_records in by_lane.items():
            handler = self.handlers[lane[0]]
            if self.lane_modes.probing(lane):
                parts.append(Part(lane, handler, unparsed=lane_records))
                continue
            parsed, rejected = self._parse(handler, lane_records)
            parts.append(Part(lane, handler, parsed, rejected))
        return parts

    def _parse(
        self, handler: Handler, records: list[Record]
    ) -> tuple[list[Parsed], list[Rejected]]:
        return parse_records(
            records,
            accepted_types=handler.accepted_types,
            max_event_bytes=self.settings.max_event_bytes,
        )

    async def _sort_out_known(self, conn: Any, part: Part) -> None:
        """Step 0 on a probing lane: count the known records, parse the others."""
        assert part.unparsed is not None
        records = part.unparsed
        peeked = peek(
            records,
            accepted_types=part.handler.accepted_types,
            max_event_bytes=self.settings.max_event_bytes,
        )
        known = await known_records(conn, peeked)
        topic = part.lane[0]  # a lane reads one topic
        part.known = Counter((topic, p["t"]) for p in peeked if p["i"] in known)
        part.parsed, part.rejected = self._parse(
            part.handler, [record for i, record in enumerate(records) if i not in known]
        )
        part.unparsed = None

    async def apply(self, conn: Any, parts: Sequence[Part]) -> BatchResult:
        """Steps 2-4 on ``conn``, inside a transaction the caller owns."""
        result = BatchResult()
        dead: list[Rejected] = []
        observed: list[tuple[Part, int]] = []  # each part with its duplicates found by parsing
        for part in parts:
            if part.unparsed is not None:
                await self._sort_out_known(conn, part)
            firsts, repeats = first_occurrences(part.parsed)
            verdicts = await part.handler.apply(conn, firsts, result.alerts)
            judgement = judge(firsts, verdicts, repeats)
            result.counts.update(judgement.counts)
            duplicates = 0
            for (_, _, outcome), n in judgement.counts.items():
                if outcome == _DUPLICATE:
                    duplicates += n
            for (topic, event_type), n in part.known.items():
                result.counts[(topic, event_type, _DUPLICATE)] += n
            for invalid in part.rejected:
                result.counts[
                    (invalid.record.topic, invalid.event_type, _invalid_outcome(invalid))
                ] += 1
            dead += part.rejected
            dead += judgement.dead
            observed.append((part, duplicates))
        result.dead_letters = await record_dead_letters(
            conn, dead, dlq_topic=self.settings.topic_dlq
        )
        for part, duplicates in observed:
            known = part.known.total()
            result.known += known
            self._observe_lane(part, duplicates=duplicates + known, known=known)
        return result

    def _observe_lane(self, part: Part, *, duplicates: int, known: int) -> None:
        records = len(part.parsed) + len(part.rejected) + known
        change = self.lane_modes.observe(
            part.lane, probed=part.probed, records=records, duplicates=duplicates, known=known
        )
        if change is not None:
            # Why a lane's cost per record moved: its records were (or stopped being) re-reads.
            log.info(
                f"known_record_probe_{change}",
                lane=f"{part.lane[0]}[partition % {self.settings.batch_lanes} = {part.lane[1]}]",
                records=records,
                duplicates=duplicates,
                known=known,
            )

    async def transact(
        self,
        pool: Any,
        part: Part,
        *,
        stopping: asyncio.Event | None = None,
        before_commit: Callable[[str], None] | None = None,
    ) -> BatchResult:
        """Apply one part in a transaction of its own, retried as a whole on outages.

        If its records make it fail (a constraint, a bug, a value nothing foresaw), the part
        is applied again in pieces to find the records to blame: each is dead-lettered
        ``unprocessable`` and the others are applied, in order. A lane never stops on data.
        """
        try:
            return await self._transact(pool, part, stopping, before_commit)
        except Exception as exc:
            if not is_record_fault(exc):
                raise
            return await self._isolate(pool, part, exc, stopping)

    async def _transact(
        self,
        pool: Any,
        part: Part,
        stopping: asyncio.Event | None,
        before_commit: Callable[[str], None] | None = None,
    ) -> BatchResult:
        async def attempt() -> BatchResult:
            async with pool.acquire() as conn, conn.transaction():
                result = await self.apply(conn, [part])
                if before_commit is not None:
                    before_commit("crash_before_db_commit")
                return result

        return await retry_transient(
            attempt,
            is_transient=db.is_retried,
            component="postgres",
            settings=self.settings,
            metrics=self.metrics,
            stopping=stopping,
        )

    async def _isolate(
        self, pool: Any, part: Part, failure: Exception, stopping: asyncio.Event | None
    ) -> BatchResult:
        """Apply ``part`` in halves, each in a transaction of its own, down to the records
        that fail on their own; dead-letter those. Innocent records apply in order: the
        first half before the second, at every level."""
        topic, lane = part.lane
        if part.unparsed is not None:  # it failed while looking up known records
            part.parsed, part.rejected = self._parse(part.handler, part.unparsed)
            part.unparsed = None
        items: list[Parsed | Rejected] = sorted(
            [*part.parsed, *part.rejected],
            key=lambda item: (item.record.partition, item.record.offset),
        )
        log.error(
            "lane_apply_failed",
            topic=topic,
            lane=lane,
            records=len(items),
            offsets=_offset_ranges(item.record for item in items),
            error=describe_exception(failure),
            action="applying in pieces to find the records to blame",
        )
        self.metrics.isolations.labels(topic=topic).inc()
        result = BatchResult()
        # Duplicates recognised before the failure were only read: they stand.
        for (known_topic, event_type), n in part.known.items():
            result.counts[(known_topic, event_type, _DUPLICATE)] += n
            result.known += n
        pending: deque[list[Parsed | Rejected]] = deque([items])
        while pending:
            chunk = pending.popleft()
            piece = Part(
                part.lane,
                part.handler,
                [item for item in chunk if isinstance(item, Parsed)],
                [item for item in chunk if isinstance(item, Rejected)],
            )
            try:
                result.add(await self._transact(pool, piece, stopping))
            except Exception as exc:
                if not is_record_fault(exc):
                    raise
                if len(chunk) > 1:
                    half = len(chunk) // 2
                    pending.extendleft([chunk[half:], chunk[:half]])  # first half first
                else:
                    result.add(await self._dead_letter_culprit(pool, chunk[0], exc, stopping))
        return result

    async def _dead_letter_culprit(
        self,
        pool: Any,
        item: Parsed | Rejected,
        failure: Exception,
        stopping: asyncio.Event | None,
    ) -> BatchResult:
        record = item.record
        rejected = unprocessable(record, failure, item.event_type)
        log.error(
            "record_unprocessable",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            event_type=item.event_type,
            error=rejected.detail,
        )

        async def write(rejected: Rejected) -> Counter[str]:
            async def attempt() -> Counter[str]:
                async with pool.acquire() as conn, conn.transaction():
                    return await record_dead_letters(
                        conn, [rejected], dlq_topic=self.settings.topic_dlq
                    )

            return await retry_transient(
                attempt,
                is_transient=db.is_retried,
                component="postgres",
                settings=self.settings,
                metrics=self.metrics,
                stopping=stopping,
            )

        try:
            dead = await write(rejected)
        except Exception as exc:
            if not is_record_fault(exc):
                raise
            # What the record carries besides its bytes (its headers) cannot be stored: keep
            # the position, the bytes and the reason, which is all a replay needs.
            log.exception(
                "dead_letter_headers_dropped",
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                error=describe_exception(exc),
            )
            rejected.record = BareRecord.of(record)
            dead = await write(rejected)
        result = BatchResult(dead_letters=dead)
        result.counts[(record.topic, item.event_type, _invalid_outcome(rejected))] += 1
        return result


class _Batch(NamedTuple):
    number: int  # counted from 1 in this process
    records: list[Record]
    submitted: float  # monotonic, at hand-over: db_ms includes waiting behind earlier batches


def tune_gc_for_batches() -> None:
    """Collect cycles less often in a process that streams batches through.

    A batch allocates tens of thousands of short-lived, acyclic objects (records, events,
    verdicts, ledger entries) that reference counting frees; with the default threshold
    (700) the cyclic collector still runs every few hundred events and walks the whole young
    heap each time, about a fifth of the parse cost. Objects alive at startup (modules,
    settings, the schema) are frozen out of every collection. Memory stays bounded: cycles
    are still collected, every 50,000 allocations instead of 700.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


_DUPLICATE = Outcome.DUPLICATE.value


def is_record_fault(exc: BaseException) -> bool:
    """True when applying failed because of the records being applied: not an outage, not a
    database set up wrong, not a shutdown."""
    return not isinstance(exc, Stopping | LaneBroken) and not db.is_retried(exc)


def _offset_ranges(records: Iterable[Record]) -> dict[str, str]:
    spans = partition_spans(list(records))
    return {f"{topic}[{partition}]": f"{lo}-{hi}" for (topic, partition), (lo, hi) in spans.items()}


def _invalid_outcome(rejected: Rejected) -> str:
    # A record that parsed into an event but broke a routing rule is refused, not malformed.
    return "rejected" if rejected.event_type != "unknown" else "invalid"


def partition_spans(records: Sequence[Record]) -> dict[tuple[str, int], tuple[int, int]]:
    """(lowest, highest) offset of the records of each (topic, partition)."""
    spans: dict[tuple[str, int], tuple[int, int]] = {}
    for record in records:
        key = (record.topic, record.partition)
        span = spans.get(key)
        if span is None:
            spans[key] = (record.offset, record.offset)
        elif record.offset > span[1]:
            spans[key] = (span[0], record.offset)
        elif record.offset < span[0]:
            spans[key] = (record.offset, span[1])
    return spans


def next_offsets(
    spans: dict[tuple[str, int], tuple[int, int]],
) -> dict[TopicPartition, int]:
    """The offset to commit per partition: one past the highest of the batch."""
    return {TopicPartition(topic, part): hi + 1 for (topic, part), (_, hi) in spans.items()}


COMMITTED_OFFSETS_TIMEOUT_S = 5.0


class ConsumerLoop(WorkerLoop):
    """Consume, process, commit, until asked to stop; then drain and leave the group."""

    def __init__(
        self,
        settings: Settings,
        pool: Any,
        processor: BatchProcessor,
        metrics: Metrics,
        consumer: Any,
        *,
        name: str,
    ) -> None:
        super().__init__(settings, metrics)
        self.pool = pool
        self.processor = processor
        self.consumer = consumer
        self.name = name
        # Held from a batch's fetch until it is handed to ``in_flight``; a rebalance takes it
        # and then waits for ``in_flight``, so every fetched batch is applied and its offsets
        # committed before the partitions move.
        self.batch_lock = asyncio.Lock()
        # Batches being applied and committed while the next one is fetched and parsed: the
        # worker's CPU work overlaps Postgres's, and memory holds one batch more than these.
        self.in_flight: BatchPipeline[_Batch, Part, BatchResult] = BatchPipeline(
            apply=self._transact,
            finish=self._finish,
            max_batches=settings.batches_in_flight,
            on_failure=self._on_lane_failure,
        )
        self.totals = BatchResult()
        self.batches = 0
        self.stalled: dict[tuple[str, int], dict[str, int]] = {}  # lane -> oldest offsets

    @property
    def ready(self) -> bool:
        return super().ready and not self.stalled

    def _on_lane_failure(self, exc: BaseException) -> None:
        """A part or a batch failed: say so now and stop fetching. The loop then raises it,
        which takes the process down to be restarted; its batches are redelivered."""
        if isinstance(exc, Stopping):
            return  # a stop request met an outage: the loop reports it on its way out
        log.error(
            "lane_failed",
            worker=self.name,
            error=describe_exception(exc),
            exc_info=exc,
        )
        self.stop()

    def _failpoint(self, point: str, batch: int) -> None:
        """Fault tests only (``CHARGELINE_FAILPOINT``): die here, as a SIGKILL would."""
        if self.settings.failpoint is None:
            return
        name, every = self.settings.failpoint.split(":")
        if name == point and batch % int(every) == 0:
            log.warning("failpoint_crash", point=point, batch=batch)
            os.kill(os.getpid(), signal.SIGKILL)

    async def run(self) -> None:
        listener = _RebalanceListener(self)
        self.consumer.subscribe(self.processor.topics, listener=listener)
        watchdog: asyncio.Task[None] | None = None
        try:
            if not await self._start():
                return
            self.started.set()
            self.metrics.ready.labels(worker=self.name).set(1)
            self.metrics.stalled_lanes.labels(worker=self.name).set(0)
            log.info("worker_started", worker=self.name, topics=self.processor.topics)
            watchdog = asyncio.create_task(self._watch_lanes(), name=f"{self.name}-watchdog")
            while not self.stopping.is_set():
                # During a rebalance getmany waits for the new assignment with no deadline:
                # a stop request must not wait for it.
                batches = await self.unless_stopped(
                    self.consumer.getmany(
                        timeout_ms=self.settings.batch_max_wait_ms,
                        max_records=self.settings.batch_max_records,
                    )
                )
                if batches is None:
                    break
                records = [record for tp_records in batches.values() for record in tp_records]
                if records and self.in_flight.failure is None:
                    async with self.batch_lock:
                        await self._submit(records)
                self._update_lag()
            await self.settle()
        except Stopping as exc:
            log.warning("worker_stopped_with_batch_unapplied", worker=self.name, reason=str(exc))
        finally:
            self.metrics.ready.labels(worker=self.name).set(0)
            if watchdog is not None:
                watchdog.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watchdog
            await self._abandon_in_flight()
            try:
                # Leaving the group lets the others take the partitions at once; if the
                # broker does not answer, the session timeout will do it instead.
                await asyncio.wait_for(self.consumer.stop(), timeout=10)
            except TimeoutError:
                log.warning("consumer_stop_timeout", worker=self.name)
            log.info(
                "worker_stopped",
                worker=self.name,
                records=self.totals.records,
                outcomes=dict(self.totals.outcome_totals()),
            )

    async def _start(self) -> bool:
        """Start the consumer; False if asked to stop first.

        Starting includes joining the group, which waits for a rebalance to complete: seconds
        normally, indefinitely when the coordinator never completes it. A stop request must
        not wait for that (SIGTERM would go unanswered until the orchestrator's SIGKILL).
        """
        started = await self.unless_stopped(self._start_consumer())
        if started is None:
            log.info("worker_stopped_before_joining", worker=self.name)
            return False
        return True

    async def _start_consumer(self) -> bool:
        await self.retry(self.consumer.start, is_transient=kafka.is_transient, component="kafka")
        return True

    async def _submit(self, records: list[Record]) -> None:
        """Parse ``records`` while earlier batches are in Postgres, then hand them over."""
        parts = self.processor.prepare(records)
        self.batches += 1
        await self.in_flight.submit(_Batch(self.batches, records, time.monotonic()), parts)

    async def settle(self) -> None:
        """Wait until every batch in flight is applied and its offsets committed (or raise
        what stopped one)."""
        await self.in_flight.settle()

    async def quiesce(self) -> None:
        """Wait until no batch is in flight, leaving any failure for ``settle`` to raise in
        the loop (a rebalance callback is the wrong place to stop the worker)."""
        await self.in_flight.quiesce()

    async def _abandon_in_flight(self) -> None:
        # Only reached with batches in flight when the loop failed: their outcome no longer
        # matters (they are redelivered to whoever reads the partitions next), but they must
        # not outlive the consumer they commit through.
        await self.in_flight.abandon()

    async def _transact(self, batch: _Batch, part: Part) -> BatchResult:
        # 1. persist each lane's part in one transaction (retried while Postgres is down);
        return await self.processor.transact(
            self.pool,
            part,
            stopping=self.stopping,
            before_commit=lambda point: self._failpoint(point, batch.number),
        )

    async def _finish(self, batch: _Batch, applied: list[BatchResult]) -> None:
        result = BatchResult()
        for part in applied:
            result.add(part)
        result.records = len(batch.records)
        spans = partition_spans(batch.records)
        result.next_offsets = next_offsets(spans)
        self._failpoint("crash_after_db_commit", batch.number)
        committed_at = time.time()
        db_done = time.monotonic()
        # 2. then, once every part has committed, commit offsets. A crash between the two
        #    redelivers a batch whose effects are all keyed: the second delivery is counted
        #    as duplicates and changes nothing.
        await self._commit(result.next_offsets)
        self._observe(
            batch.records,
            spans,
            result,
            committed_at,
            db_s=db_done - batch.submitted,
            offsets_s=time.monotonic() - db_done,
        )

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        try:
            await self.retry(
                lambda: self.consumer.commit(offsets),
                is_transient=kafka.is_transient,
                component="kafka",
                max_attempts=20,
            )
        except (KafkaError, Stopping) as exc:
            # Safe to move on: the batch is in Postgres, and a redelivery is a duplicate.
            log.warning(
                "offset_commit_skipped",
                worker=self.name,
                error=f"{type(exc).__name__}: {exc}",
                offsets={f"{tp.topic}[{tp.partition}]": off for tp, off in offsets.items()},
            )

    def _observe(
        self,
        records: list[Record],
        spans: dict[tuple[str, int], tuple[int, int]],
        result: BatchResult,
        committed_at: float,
        *,
        db_s: float,
        offsets_s: float,
    ) -> None:
        duration = db_s + offsets_s
        self.totals.add(result)
        m = self.metrics
        m.batch_size.labels(worker=self.name).observe(len(records))
        m.batch_duration.labels(worker=self.name).observe(duration)
        for (topic, event_type, outcome), n in result.counts.items():
            m.events.labels(topic=topic, type=event_type, outcome=outcome).inc(n)
        for reason, n in result.dead_letters.items():
            m.dead_letters.labels(reason=reason).inc(n)
        for alert_type, n in result.alerts.items():
            m.alerts.labels(type=alert_type).inc(n)
        committed_ms = committed_at * 1000
        for topic in {record.topic for record in records}:
            m.event_lag.observe_many(
                topic,
                [max(0.0, committed_ms - r.timestamp) / 1000 for r in records if r.topic == topic],
            )
        log.info(
            "batch_flushed",
            worker=self.name,
            records=len(records),
            offsets={
                f"{topic}[{partition}]": f"{lo}-{hi}"
                for (topic, partition), (lo, hi) in spans.items()
            },
            outcomes=dict(result.outcome_totals()),
            known_duplicates=result.known,
            dead_letters=dict(result.dead_letters),
            alerts=dict(result.alerts),
            duration_ms=round(duration * 1000, 1),
            db_ms=round(db_s * 1000, 1),
            offsets_ms=round(offsets_s * 1000, 1),
        )

    async def _watch_lanes(self) -> None:
        """Report every lane that holds records and has not committed them for longer than
        ``lane_stall_timeout_s`` while Postgres answers: a lock never released, a database
        refusing every attempt. An outage is not a stall (the retries report it)."""
        timeout = self.settings.lane_stall_timeout_s
        while True:
            await asyncio.sleep(min(timeout / 4, 5.0))
            now = time.monotonic()
            late: dict[tuple[str, int], tuple[float, dict[str, int]]] = {}
            for batch, part in self.in_flight.unfinished():
                if now - batch.submitted <= timeout:
                    continue
                _, oldest = late.setdefault(part.lane, (batch.submitted, {}))
                for record in part.records():
                    name = f"{record.topic}[{record.partition}]"
                    oldest[name] = min(oldest.get(name, record.offset), record.offset)
            if late and not await self._postgres_answers():
                late = {}
            for lane, (since, oldest) in late.items():
                if lane not in self.stalled:
                    log.error(
                        "lane_stalled",
                        worker=self.name,
                        lane=f"{lane[0]}[partition % {self.settings.batch_lanes} = {lane[1]}]",
                        oldest_offsets=oldest,
                        waiting_s=round(now - since, 1),
                    )
            for lane in self.stalled.keys() - late.keys():
                log.info("lane_stall_over", worker=self.name, lane=f"{lane[0]}[{lane[1]}]")
            self.stalled = {lane: oldest for lane, (_, oldest) in late.items()}
            self.metrics.stalled_lanes.labels(worker=self.name).set(len(self.stalled))

    async def _postgres_answers(self) -> bool:
        # A connection of its own: the pool's may all be held by the stalled lanes.
        try:
            conn = await asyncpg.connect(self.settings.dsn, timeout=5)
        except Exception:
            return False
        try:
            await conn.fetchval("SELECT 1", timeout=5)
        except Exception:
            return False
        finally:
            await conn.close(timeout=5)
        return True

    def _update_lag(self) -> None:
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            position = self.totals.next_offsets.get(tp)
            if highwater is not None and position is not None:
                self.metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(
                    max(0, highwater - position)
                )


class _RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, loop: ConsumerLoop) -> None:
        self.loop = loop

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # Let the batch in flight finish its database and offset commits before the
        # partitions move, so the next owner starts where this one stopped.
        async with self.loop.batch_lock:
            await self.loop.quiesce()
            log.info("partitions_revoked", worker=self.loop.name, partitions=_names(revoked))
            for tp in revoked:
                self.loop.totals.next_offsets.pop(tp, None)
                # Another member reports this partition's lag from now on.
                with contextlib.suppress(KeyError):
                    self.loop.metrics.consumer_lag.remove(tp.topic, str(tp.partition))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        fresh = await self._without_committed_offsets(assigned)
        lanes = self.loop.settings.batch_lanes
        for tp in fresh:
            self.loop.processor.lane_modes.expect_known((tp.topic, tp.partition % lanes))
        log.info(
            "partitions_assigned",
            worker=self.loop.name,
            partitions=_names(assigned),
            without_committed_offsets=_names(fresh),
        )

    async def _without_committed_offsets(
        self, assigned: set[TopicPartition]
    ) -> set[TopicPartition]:
        # Read from their start by this group: a re-read of what Postgres holds, if anything
        # (workers/known.py). Only a hint: when the coordinator cannot say in time (aiokafka
        # retries without end while the broker is away), the lanes learn their mode from
        # their batches as before.
        async def fresh() -> set[TopicPartition]:
            return {tp for tp in assigned if await self.loop.consumer.committed(tp) is None}

        try:
            return await asyncio.wait_for(fresh(), timeout=COMMITTED_OFFSETS_TIMEOUT_S)
        except (KafkaError, TimeoutError) as exc:
            log.warning("committed_offsets_unknown", worker=self.loop.name, error=repr(exc))
            return set()


def _names(partitions: set[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions)
