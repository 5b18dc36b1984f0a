"""The consumer loop: a consumer group's batches through the ``BatchProcessor``, lanes side
by side (``pipeline``), offsets committed only once every transaction of a batch has
committed, rebalances waited out, a stalled lane reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import time
from typing import Any, NamedTuple

import asyncpg
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from workers import kafka
from workers.db import Pool
from workers.ingest.parse import Record, describe_exception
from workers.ingest.pipeline import BatchPipeline
from workers.ingest.processor import (
    BatchProcessor,
    BatchResult,
    Part,
    lane_name,
    partition_spans,
)
from workers.lifecycle import WorkerLoop
from workers.logs import get_logger
from workers.metrics import Metrics
from workers.retry import Stopping
from workers.settings import Settings

log = get_logger("chargeline.ingest")


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


def next_offsets(
    spans: dict[tuple[str, int], tuple[int, int]],
) -> dict[TopicPartition, int]:
    """The offset to commit per partition: one past the highest of the batch."""
    return {TopicPartition(topic, part): hi + 1 for (topic, part), (_, hi) in spans.items()}


COMMITTED_OFFSETS_TIMEOUT_S = 5.0


OUTAGE_PROBE_S = 10.0
"""How long a lane may hold its records before the watchdog asks Postgres whether it
answers at all (a transaction takes well under a second)."""


def value_bytes(records: list[Record]) -> int:
    """The bytes of the records' values: what a batch holds in memory, roughly twice over
    once parsed."""
    return sum(len(record.value) for record in records if record.value is not None)


class ConsumerLoop(WorkerLoop):
    """Consume, process, commit, until asked to stop; then drain and leave the group."""

    def __init__(
        self,
        settings: Settings,
        pool: Pool,
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
        self.postgres_unanswering = False  # a lane waits and Postgres answers no probe

    @property
    def ready(self) -> bool:
        return super().ready and not self.stalled and not self.postgres_unanswering

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
                        await self._submit(await self._gather(records))
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

    async def _gather(self, records: list[Record]) -> list[Record]:
        """Add what the next fetches bring to ``records`` for ``batch_linger_ms``, up to
        ``batch_max_records`` or ``batch_max_bytes`` of record values.

        Each batch costs a transaction per lane, whatever its size: under light load, a
        batch per fetch spends the machine on statements and commits of a few records each,
        and the records wait for that. With a backlog the first fetch is full and nothing
        waits.

        Called with ``batch_lock`` held. aiokafka marks a rebalance begun before it calls
        the revoke listener, which waits for that lock, and from then on ``getmany`` waits
        for the new assignment with no deadline: each fetch here is bounded by the linger
        left, so the records gathered so far are submitted and the rebalance goes on.
        """
        limit = self.settings.batch_max_records
        size, max_size = value_bytes(records), self.settings.batch_max_bytes
        deadline = time.monotonic() + self.settings.batch_linger_ms / 1000
        while len(records) < limit and size < max_size and not self.stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                more = await asyncio.wait_for(
                    self.consumer.getmany(
                        timeout_ms=max(1, int(left * 1000)), max_records=limit - len(records)
                    ),
                    timeout=left,
                )
            except TimeoutError:
                break
            fetched = [record for tp_records in more.values() for record in tp_records]
            records += fetched
            size += value_bytes(fetched)
        return records

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
        refusing every attempt. An outage is not a stall: one that refuses connections shows
        as retries, and one that answers nothing (a frozen server, a network that drops
        packets) is found here, once a lane has waited ``OUTAGE_PROBE_S``, and reported as
        ``postgres_not_answering`` with the worker not ready until it answers again."""
        timeout = self.settings.lane_stall_timeout_s
        probe_after = min(timeout, OUTAGE_PROBE_S)
        while True:
            await asyncio.sleep(min(probe_after / 4, 5.0))
            now = time.monotonic()
            waiting: dict[tuple[str, int], tuple[float, dict[str, int]]] = {}
            for batch, part in self.in_flight.unfinished():
                if now - batch.submitted <= probe_after:
                    continue
                _, oldest = waiting.setdefault(part.lane, (batch.submitted, {}))
                for record in part.records():
                    name = f"{record.topic}[{record.partition}]"
                    oldest[name] = min(oldest.get(name, record.offset), record.offset)
            answers = not waiting or await self._postgres_answers()
            self._report_outage(answers, waiting, now)
            late = {
                lane: waited
                for lane, waited in waiting.items()
                if answers and now - waited[0] > timeout
            }
            for lane, (since, oldest) in late.items():
                if lane not in self.stalled:
                    log.error(
                        "lane_stalled",
                        worker=self.name,
                        lane=lane_name(lane, self.settings.batch_lanes),
                        oldest_offsets=oldest,
                        waiting_s=round(now - since, 1),
                    )
            for lane in self.stalled.keys() - late.keys():
                log.info(
                    "lane_stall_over",
                    worker=self.name,
                    lane=lane_name(lane, self.settings.batch_lanes),
                )
            self.stalled = {lane: oldest for lane, (_, oldest) in late.items()}
            self.metrics.stalled_lanes.labels(worker=self.name).set(len(self.stalled))

    def _report_outage(
        self,
        answers: bool,
        waiting: dict[tuple[str, int], tuple[float, dict[str, int]]],
        now: float,
    ) -> None:
        if not answers and not self.postgres_unanswering:
            log.warning(
                "postgres_not_answering",
                worker=self.name,
                lanes=[lane_name(lane, self.settings.batch_lanes) for lane in waiting],
                waiting_s=round(now - min(since for since, _ in waiting.values()), 1),
            )
            self.metrics.ready.labels(worker=self.name).set(0)
        elif answers and self.postgres_unanswering:
            log.info("postgres_answering_again", worker=self.name)
            self.metrics.ready.labels(worker=self.name).set(1)
        self.postgres_unanswering = not answers

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
                self.metrics.consumer_fetch_lag.labels(
                    topic=tp.topic, partition=str(tp.partition)
                ).set(max(0, highwater - position))


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
                    self.loop.metrics.consumer_fetch_lag.remove(tp.topic, str(tp.partition))

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
        # (workers/ingest/known.py). Only a hint: when the coordinator cannot say in time (aiokafka
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
