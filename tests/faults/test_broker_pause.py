"""The broker frozen for 20 s (SIGSTOP, then SIGCONT) in the middle of a load: longer than
the session timeout and the clients' request timeout, with fetches, offset commits,
heartbeats, the outbox relay's sends and the lag monitor's requests in flight. The workers resume by themselves within 60 s of the
broker coming back, and every event is applied exactly once. A worker started while the
broker is frozen (so it cannot join the group) still stops promptly on SIGTERM."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from pathlib import Path

import pytest

from tests.faults.expected import check, expected, mixed_load, row_counts, wait_applied
from tests.faults.harness import Producer, fault_settings, wait_until, workers
from tests.support import Stack, outbox_empty, setup_pipeline
from workers.settings import Settings

PAUSE_S = 20
RESUME_WITHIN_S = 60
EVENTS = 10_000


async def test_broker_paused_for_20s_workers_resume_within_60s(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    if stack.local is None:
        pytest.skip("needs the embedded stack to pause the broker")
    broker = stack.local.broker
    # Requests time out within the pause, as aiokafka's 40 s default would in a longer one:
    # every client's error paths run, the lag monitor's metadata requests among them.
    settings = fault_settings(
        settings, batch_max_records=100, kafka_request_timeout_ms=10_000, monitor_interval_s=1
    )
    await setup_pipeline(settings, partitions=4, flows=[("flow_a", "active")])
    load = mixed_load(random.Random(5), EVENTS)
    want = expected(load)
    with workers(settings, tmp_path) as group:
        ingest = group.spawn("charges", "usage")
        relay = group.spawn("charges", "usage", "outbox", "monitor")
        async with Producer(settings) as producer:
            await producer.publish(settings, load.sent)
        # Freeze the broker once a quarter of the load is in: the rest is still to fetch.
        await wait_until(
            lambda: _applied_at_least(settings, len(want.usage) // 4),
            timeout=60,
            what="a quarter of the load applied",
            every=0.05,
        )
        applied_before = await row_counts(settings)
        broker.pause()
        try:
            paused_at = time.monotonic()
            # A worker started now cannot join the group; asked to stop, it must stop anyway.
            late = group.spawn("charges", "usage")
            await asyncio.sleep(6)
            late.signal(signal.SIGTERM)
            stopped_in = await wait_until(
                lambda: not late.alive, timeout=PAUSE_S - 8, what="the joining worker to stop"
            )
            await wait_until(lambda: time.monotonic() - paused_at >= PAUSE_S, timeout=60, what="")
            applied_during = await row_counts(settings)
        finally:
            broker.resume()
        resumed = await wait_applied(settings, want, timeout=RESUME_WITHIN_S)
        drained = await wait_until(
            lambda: outbox_empty(settings), timeout=RESUME_WITHIN_S, what="outbox published"
        )
        assert ingest.alive and relay.alive, "a worker died while the broker was paused"
        summary = await check(settings, want)
        kafka_retries = sum(line.get("component") == "kafka" for w in (ingest, relay)
                            for line in w.log("retrying"))  # fmt: skip
        rejoins = sum(len(w.log("partitions_assigned")) for w in (ingest, relay))
    print(
        f"injected a broker SIGSTOP of {PAUSE_S}s with {applied_before} rows applied (and "
        f"{applied_during} at its end) of {len(load.sent)} records; after SIGCONT everything "
        f"was applied in {resumed:.1f}s and the outbox drained in {drained:.1f}s more "
        f"(limit {RESUME_WITHIN_S}s); {kafka_retries} Kafka retries, {rejoins} assignments; "
        f"a worker started during the pause stopped {stopped_in:.1f}s after its SIGTERM; "
        f"checked {summary}"
    )


async def _applied_at_least(settings: Settings, usage_rows: int) -> bool:
    return (await row_counts(settings))["usage_events"] >= usage_rows
