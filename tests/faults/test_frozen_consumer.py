"""A consumer frozen (SIGSTOP) while records keep arriving: its own lag gauge stops with it,
the lag monitor's does not. The monitor reads the broker: log ends (raised to a fetch's high
watermark, since this broker's ListOffsets can fall short of the end) and the group's
committed offsets; the lag grows with every record published, the partitions become
stalled once their committed offsets have not moved for ``monitor_stall_s``, and both clear
once the consumer runs again."""

from __future__ import annotations

import asyncio
import signal

from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.support import (
    produce,
    record,
    settings_env,
    setup_pipeline,
    spawn_worker,
    usage,
    wait_for,
)
from workers.jobs.monitor import LagMonitor
from workers.kafka import client_options
from workers.metrics import Metrics
from workers.settings import Settings

PARTITIONS = 2


def gauge(metrics: Metrics, name: str, topic: str, partition: int) -> float:
    value = metrics.registry.get_sample_value(name, {"topic": topic, "partition": str(partition)})
    assert value is not None, f"{name} not exported for {topic}/{partition}"
    return value


def total_lag(metrics: Metrics, topic: str) -> float:
    return sum(gauge(metrics, "chargeline_consumer_lag", topic, p) for p in range(PARTITIONS))


async def test_the_monitor_reads_the_true_log_end_on_this_broker(settings: Settings) -> None:
    await setup_pipeline(settings, partitions=1)
    topic = settings.topic_usage
    for n in range(3):  # three produce requests: three record batches
        await produce(settings, topic, [record(usage("c1", f"u{n}-{i}", 1)) for i in range(50)])
    monitor = LagMonitor(settings, None, Metrics())  # type: ignore[arg-type]  # no pool used
    try:
        lags = await monitor.measure()
    finally:
        await monitor.close()
    assert lags[TopicPartition(topic, 0)] == 150  # nothing committed: every record
    assert gauge(monitor.metrics, "chargeline_consumer_log_end_offset", topic, 0) == 150
    # ListOffsets alone, for the record: exact on Apache Kafka, short on this broker.
    consumer = AIOKafkaConsumer(group_id=None, **client_options(settings))
    await consumer.start()
    try:
        listed = (await consumer.end_offsets([TopicPartition(topic, 0)]))[TopicPartition(topic, 0)]
    finally:
        await consumer.stop()
    assert listed <= 150


async def test_a_frozen_consumer_shows_growing_lag_then_stalls(settings: Settings) -> None:
    settings = settings.model_copy(update={"monitor_stall_s": 2.0})
    await setup_pipeline(settings, partitions=PARTITIONS)
    topic = settings.topic_usage
    monitor = LagMonitor(settings, None, Metrics())  # type: ignore[arg-type]  # no pool used
    worker = spawn_worker(settings_env(settings), "usage")
    try:
        await produce(settings, topic, [record(usage(f"c{i}", f"a{i}", 1)) for i in range(40)])

        async def caught_up() -> bool:
            await monitor.measure()
            return total_lag(monitor.metrics, topic) == 0

        await wait_for(caught_up, what="the worker to commit everything")
        worker.send_signal(signal.SIGSTOP)
        seen = []
        for n in range(4):
            await produce(
                settings, topic, [record(usage(f"c{i}", f"b{n}-{i}", 1)) for i in range(25)]
            )
            await monitor.measure()
            seen.append(total_lag(monitor.metrics, topic))
        assert seen == [25, 50, 75, 100], seen
        stalled = "chargeline_consumer_stalled"
        assert all(gauge(monitor.metrics, stalled, topic, p) == 0 for p in range(PARTITIONS))
        await asyncio.sleep(settings.monitor_stall_s + 0.5)
        await monitor.measure()
        assert total_lag(monitor.metrics, topic) == 100
        assert all(gauge(monitor.metrics, stalled, topic, p) == 1 for p in range(PARTITIONS))

        worker.send_signal(signal.SIGCONT)
        await wait_for(caught_up, what="the worker to catch up after SIGCONT")
        assert all(gauge(monitor.metrics, stalled, topic, p) == 0 for p in range(PARTITIONS))
    finally:
        worker.send_signal(signal.SIGCONT)
        worker.terminate()
        worker.wait(timeout=60)
        await monitor.close()
