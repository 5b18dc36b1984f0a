"""The batch processor every consuming worker shares: parse, dedupe, apply, dead-letter.

``BatchProcessor`` parses a batch of records into parts, one per lane, and applies a part in
a Postgres transaction (replay applies all parts in one). ``ConsumerLoop``
(``workers.ingest.consumer``) feeds it from a consumer group through
``workers.ingest.pipeline`` and moves the group's offsets only after every
transaction of the batch has committed. Exactly-once *effect* comes from the pair: effects
are keyed by permanent dedup keys and dead letters by source position, so a batch delivered
twice (a crash between the database commit and the offset commit, a stale worker after a
rebalance) changes nothing the second time.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from aiokafka import TopicPartition

from workers import db
from workers.db import Connection, Pool
from workers.ingest.deadletters import record_dead_letters
from workers.ingest.dedupe import Outcome, Verdict, first_occurrences, judge
from workers.ingest.known import LaneModes, known_records, peek
from workers.ingest.parse import (
    BareRecord,
    Parsed,
    Record,
    Rejected,
    describe_exception,
    parse_records,
    unprocessable,
)
from workers.ingest.pipeline import LaneBroken
from workers.logs import get_logger
from workers.metrics import Metrics
from workers.retry import Stopping, retry_transient
from workers.settings import Settings

log = get_logger("chargeline.ingest")
T = TypeVar("T")

MERGED_LANE = -1
"""The lane number of a part that stands for every lane of its topic."""

SMALL_PART_RECORDS = 200
"""Below this many records per lane, a topic's share of a batch is applied as one part, in
one transaction, instead of one per lane. Each transaction costs about ten statements and a
commit whatever its size; a small batch, what light load brings, gains nothing from lanes
side by side and pays for each. With a backlog the parts are large and nothing is merged."""


GENERIC_PLAN_RECORDS = 500
"""Up to this many records, a part's statements run on generic plans (planned once per
connection and kept) rather than the custom plans every connection asks for
(``workers.db.SERVER_SETTINGS``): planning a batch statement anew costs Postgres more than
running it on a few hundred rows, and a plan made for a handful of rows serves that many as
well. Large parts keep planning each execution, for their arrays' true sizes."""

REUSE_PLANS = "SET LOCAL plan_cache_mode = force_generic_plan"


def lane_name(lane: tuple[str, int], lanes: int) -> str:
    """A lane as logs name it: ``topic[partition % 3 = 1]``, or ``topic[every partition]``."""
    topic, number = lane
    if number == MERGED_LANE:
        return f"{topic}[every partition]"
    return f"{topic}[partition % {lanes} = {number}]"


def offset_ranges(records: Sequence[Record]) -> dict[str, str]:
    """``{"billing.usage/3": "1200-1399"}``: the offsets of a part, per partition."""
    ranges: dict[str, list[int]] = {}
    for record in records:
        span = ranges.setdefault(f"{record.topic}/{record.partition}", [record.offset] * 2)
        span[0] = min(span[0], record.offset)
        span[1] = max(span[1], record.offset)
    return {name: f"{low}-{high}" for name, (low, high) in sorted(ranges.items())}


class Handler(Protocol):
    """Applies the valid events of one topic inside the batch's transaction."""

    name: str
    topic: str
    accepted_types: frozenset[str]

    async def apply(
        self, conn: Connection, events: list[Parsed], alerts: Counter[str]
    ) -> list[Verdict]:
        """Apply the first occurrence of each dedup key; one verdict per event, in order.
        Count the alerts written (by type) into ``alerts``."""
        ...


@dataclass(slots=True)
class Part:
    """One lane's share of a batch, parsed: what one transaction applies.

    On a lane that probes for known records (``workers.ingest.known``) the records stay in
    ``unparsed`` until the transaction has looked them up; those known are counted in
    ``known`` by (topic, type), the others parsed. A retried transaction does not redo it.
    """

    lane: tuple[str, int]  # (topic, partition modulo batch_lanes), or (topic, MERGED_LANE)
    handler: Handler
    parsed: list[Parsed] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    unparsed: list[Record] | None = None
    known: Counter[tuple[str, str]] = field(default_factory=Counter)
    # The lanes whose order it keeps (workers.ingest.pipeline): its own, or for a merged
    # part every lane of its topic.
    covers: tuple[tuple[str, int], ...] = ()
    probed: bool = field(init=False, default=False)  # prepared with unparsed records

    def __post_init__(self) -> None:
        self.probed = self.unparsed is not None
        if not self.covers:
            self.covers = (self.lane,)

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
    known: int = 0  # duplicates recognised by digest, never parsed (workers.ingest.known)
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
    on a lane of mostly re-reads, 0. known records first (``workers.ingest.known``)."""

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
        """Parse per lane (a topic's partitions modulo ``batch_lanes``), or a small batch's
        topic as one part (``SMALL_PART_RECORDS``); pure CPU work done once, outside any
        retry."""
        lanes = self.settings.batch_lanes
        merged: dict[str, list[Record]] = {topic: [] for topic in self._merged_topics(records)}
        by_lane: dict[tuple[str, int], list[Record]] = {}
        for record in records:
            topic_records = merged.get(record.topic)
            if topic_records is not None:
                topic_records.append(record)
            else:
                by_lane.setdefault((record.topic, record.partition % lanes), []).append(record)
        parts = []
        for topic, topic_records in merged.items():
            handler = self.handlers[topic]
            parsed, rejected = self._parse(handler, topic_records)
            every_lane = tuple((topic, number) for number in range(lanes))
            parts.append(Part((topic, MERGED_LANE), handler, parsed, rejected, covers=every_lane))
        for lane, lane_records in by_lane.items():
            handler = self.handlers[lane[0]]
            if self.lane_modes.probing(lane):
                parts.append(Part(lane, handler, unparsed=lane_records))
                continue
            parsed, rejected = self._parse(handler, lane_records)
            parts.append(Part(lane, handler, parsed, rejected))
        return parts

    def _merged_topics(self, records: Sequence[Record]) -> set[str]:
        """The topics whose records in this batch are few enough to apply as one part. A
        topic with a lane that probes for known records is never merged: its parts keep
        the lanes' modes."""
        lanes = self.settings.batch_lanes
        if lanes == 1:
            return set()
        counts = Counter(record.topic for record in records)
        return {
            topic
            for topic, count in counts.items()
            if count < SMALL_PART_RECORDS * lanes
            and not any(self.lane_modes.probing((topic, number)) for number in range(lanes))
        }

    def _parse(
        self, handler: Handler, records: list[Record]
    ) -> tuple[list[Parsed], list[Rejected]]:
        return parse_records(
            records,
            accepted_types=handler.accepted_types,
            max_event_bytes=self.settings.max_event_bytes,
        )

    async def _sort_out_known(self, conn: Connection, part: Part) -> None:
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

    async def apply(self, conn: Connection, parts: Sequence[Part]) -> BatchResult:
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
        # A merged part's share of duplicates stands for each lane it covers: a re-read
        # arriving in small batches still sets its lanes probing.
        records = len(part.parsed) + len(part.rejected) + known
        for lane in part.covers:
            change = self.lane_modes.observe(
                lane, probed=part.probed, records=records, duplicates=duplicates, known=known
            )
            if change is not None:
                # Why a lane's cost per record moved: its records were (or stopped being)
                # re-reads.
                log.info(
                    f"known_record_probe_{change}",
                    lane=lane_name(lane, self.settings.batch_lanes),
                    offsets=offset_ranges(part.records()),
                    records=records,
                    duplicates=duplicates,
                    known=known,
                )

    async def transact(
        self,
        pool: Pool,
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
        pool: Pool,
        part: Part,
        stopping: asyncio.Event | None,
        before_commit: Callable[[str], None] | None = None,
    ) -> BatchResult:
        async def attempt() -> BatchResult:
            async with pool.acquire() as conn, conn.transaction():
                if len(part.records()) <= GENERIC_PLAN_RECORDS:
                    await conn.execute(REUSE_PLANS)
                result = await self.apply(conn, [part])
                if before_commit is not None:
                    before_commit("crash_before_db_commit")
                return result

        return await self._retried(attempt, stopping)

    async def _retried(
        self, attempt: Callable[[], Awaitable[T]], stopping: asyncio.Event | None
    ) -> T:
        """``attempt`` (one transaction) tried again through outages and a database set up
        wrong; anything else is for the caller to judge."""
        return await retry_transient(
            attempt,
            is_transient=db.is_retried,
            component="postgres",
            settings=self.settings,
            metrics=self.metrics,
            stopping=stopping,
        )

    async def _isolate(
        self, pool: Pool, part: Part, failure: Exception, stopping: asyncio.Event | None
    ) -> BatchResult:
        """Apply ``part`` in halves, each in a transaction of its own, down to the records
        that fail on their own; dead-letter those. Innocent records apply in order: the
        first half before the second, at every level."""
        topic = part.lane[0]
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
            lane=lane_name(part.lane, self.settings.batch_lanes),
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
        pool: Pool,
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

            return await self._retried(attempt, stopping)

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
