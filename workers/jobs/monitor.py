"""The lag monitor (``chargeline worker monitor``; also part of ``all``): the consumer group's
lag per partition as the broker sees it, from outside the workers.

A worker's own view of its lag (``chargeline_consumer_fetch_lag``) is only as fresh as its
last fetch: a consumer that stopped fetching (stuck after a rebalance, its loop blocked, its
process frozen) stops updating it while its health checks may stay green. The monitor asks
the broker instead, every ``CHARGELINE_MONITOR_INTERVAL_S``:

- the log end of each partition of the input topics. ListOffsets (``end_offsets``) is exact
  on Apache Kafka but only a lower bound on some brokers (Tansu answers the base offset of
  the last batch), so the monitor also fetches a few bytes from there and takes the high
  watermark the fetch response carries, which is exact on both;
- the group's committed offset per partition (OffsetFetch, as any admin tool does; the
  monitor never joins the group nor commits).

Lag is their difference (a partition the group never committed counts from its first
offset). A partition whose lag is above zero while its committed offset has not moved for
``CHARGELINE_MONITOR_STALL_S`` is *stalled*: ``chargeline_consumer_stalled`` is 1 and a
warning is logged once, until it moves again. One monitor is enough; several report the
same figures.
"""

from __future__ import annotations

import time
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from workers import kafka
from workers.db import Pool
from workers.lifecycle import PeriodicWorker
from workers.logs import get_logger
from workers.metrics import Metrics
from workers.settings import Settings

log = get_logger("chargeline.monitor")

_PEEK_BYTES = 1024  # what a fetch may bring per partition: the high watermark is the point
_PEEK_WAIT_MS = 100


class LagMonitor(PeriodicWorker):
    name = "monitor"

    def __init__(self, settings: Settings, pool: Pool, metrics: Metrics) -> None:
        super().__init__(settings, metrics)
        self.consumer: AIOKafkaConsumer | None = None
        self.admin: AIOKafkaAdminClient | None = None
        # Per partition: the committed offset last seen and when it last changed.
        self.commits: dict[TopicPartition, tuple[int, float]] = {}
        self.stalled: set[TopicPartition] = set()

    @property
    def interval_s(self) -> float:
        return self.settings.monitor_interval_s

    async def tick(self) -> bool:
        await self.retry(self.measure, is_transient=kafka.is_transient, component="kafka")
        return False

    async def close(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
        if self.admin is not None:
            await self.admin.close()

    async def _clients(self) -> tuple[AIOKafkaConsumer, AIOKafkaAdminClient]:
        if self.consumer is None:
            consumer = AIOKafkaConsumer(
                group_id=None,
                enable_auto_commit=False,
                max_partition_fetch_bytes=_PEEK_BYTES,
                fetch_max_wait_ms=_PEEK_WAIT_MS,
                client_id="chargeline-monitor",
                **kafka.client_options(self.settings),
            )
            await consumer.start()
            self.consumer = consumer
        if self.admin is None:
            admin = AIOKafkaAdminClient(
                client_id="chargeline-monitor", **kafka.client_options(self.settings)
            )
            await admin.start()
            self.admin = admin
        return self.consumer, self.admin

    async def measure(self) -> dict[TopicPartition, int]:
        """One look: every input partition's lag, exported; returned for the tests."""
        consumer, admin = await self._clients()
        tps = await self._partitions(consumer)
        if not tps:
            return {}
        ends = await self._log_ends(consumer, tps)
        firsts = await consumer.beginning_offsets(tps)
        committed: dict[TopicPartition, Any] = await admin.list_consumer_group_offsets(
            self.settings.consumer_group, partitions=tps
        )
        now = time.monotonic()
        lags: dict[TopicPartition, int] = {}
        for tp in tps:
            mark = committed.get(tp)
            offset = mark.offset if mark is not None and mark.offset >= 0 else firsts[tp]
            lags[tp] = lag = max(0, ends[tp] - offset)
            self._export(tp, ends[tp], offset, lag, now)
        return lags

    async def _partitions(self, consumer: AIOKafkaConsumer) -> list[TopicPartition]:
        present = await consumer.topics()
        tps = []
        for topic in kafka.input_topics(self.settings).values():
            if topic in present:
                tps += [
                    TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()
                ]
        return sorted(tps)

    async def _log_ends(
        self, consumer: AIOKafkaConsumer, tps: list[TopicPartition]
    ) -> dict[TopicPartition, int]:
        """Each partition's log end: ListOffsets, raised to the high watermark of a fetch
        from there (ListOffsets can fall short of the end; the high watermark cannot)."""
        listed: dict[TopicPartition, int] = await consumer.end_offsets(tps)
        if set(consumer.assignment()) != set(tps):
            consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, listed[tp])
        consumer.resume(*tps)
        try:
            await consumer.getmany(*tps, timeout_ms=2 * _PEEK_WAIT_MS + 200)
        finally:
            consumer.pause(*tps)
        return {tp: max(listed[tp], consumer.highwater(tp) or 0) for tp in tps}

    def _export(self, tp: TopicPartition, end: int, offset: int, lag: int, now: float) -> None:
        labels = {"topic": tp.topic, "partition": str(tp.partition)}
        self.metrics.consumer_lag.labels(**labels).set(lag)
        self.metrics.consumer_log_end_offset.labels(**labels).set(end)
        self.metrics.consumer_committed_offset.labels(**labels).set(offset)
        seen = self.commits.get(tp)
        if seen is None or seen[0] != offset:
            self.commits[tp] = seen = (offset, now)
        stalled = lag > 0 and now - seen[1] >= self.settings.monitor_stall_s
        self.metrics.consumer_stalled.labels(**labels).set(1 if stalled else 0)
        if stalled and tp not in self.stalled:
            self.stalled.add(tp)
            log.warning(
                "consumer_stalled",
                group=self.settings.consumer_group,
                lag=lag,
                committed_offset=offset,
                unmoved_s=round(now - seen[1]),
                **labels,
            )
        elif not stalled and tp in self.stalled:
            self.stalled.discard(tp)
            log.info("consumer_moving_again", group=self.settings.consumer_group, lag=lag, **labels)
