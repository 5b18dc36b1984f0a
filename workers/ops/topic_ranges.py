"""Topic ranges for ``chargeline replay``: what ``--since``, ``--until``, ``--from-offsets``
and ``--to-offsets`` mean on each partition of an input topic, and the reading of such a range
with a consumer of its own (no group, manual assignment, nothing committed anywhere: the live
group's offsets never move).

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
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from datetime import datetime

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import OffsetOutOfRangeError

from workers.errors import BrokerUnavailable, ChargelineError, UsageError
from workers.ingest.parse import Record
from workers.kafka import client_options
from workers.settings import Settings

# How long a partition may go without delivering anything below its end before the replay
# gives up with an error (a broker that stopped answering); a re-run is always safe.
STALL_TIMEOUT_S = 60.0
FETCH_TIMEOUT_MS = 500


class RangeError(UsageError):
    """The requested range does not fit the topic."""


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
        **client_options(settings),
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
