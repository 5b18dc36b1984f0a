"""A worker frozen (SIGSTOP) past its session timeout, preferably in the middle of its
database transaction, while another member takes its partitions; then thawed (SIGCONT)
(issue 8, fault 2). The stale worker finishes the batch it held and tries to commit offsets
for partitions it no longer owns; whatever it applies, nothing is applied twice and
nothing is lost."""

from __future__ import annotations

import asyncio
import random
import signal
from pathlib import Path

from tests.faults.expected import check, expected, mixed_load, wait_applied
from tests.faults.harness import (
    Producer,
    fault_settings,
    publish_paced,
    signal_in_transaction,
    wait_until,
    workers,
)
from tests.support import setup_pipeline
from workers.settings import Settings

PARTITIONS = 4
EVENTS = 5_000


async def test_stale_worker_after_sigstop_applies_nothing_twice(
    settings: Settings, tmp_path: Path
) -> None:
    settings = fault_settings(settings, batch_max_records=200)
    await setup_pipeline(settings, partitions=PARTITIONS, flows=[("flow_a", "active")])
    load = mixed_load(random.Random(2), EVENTS)
    every = {f"{t}[{p}]" for t in (settings.topic_charges, settings.topic_usage)
             for p in range(PARTITIONS)}  # fmt: skip
    frozen_for = settings.kafka_session_timeout_ms / 1000 + 5
    with workers(settings, tmp_path) as group:
        stale, other = group.spawn("charges", "usage"), group.spawn("charges", "usage")
        async with Producer(settings) as producer:
            publishing = asyncio.create_task(
                publish_paced(producer, settings, load.sent, seconds=20, slices=100)
            )
            await wait_until(
                lambda: stale.assigned() and other.assigned() and stale.log("batch_flushed"),
                timeout=30,
                what="both workers consuming",
            )
            caught = await signal_in_transaction(settings, stale, signal.SIGSTOP, within=5)
            held = stale.assigned()
            await asyncio.sleep(frozen_for)
            took_over = other.assigned()
            stale.signal(signal.SIGCONT)
            await publishing
        want = expected(load)
        waited = await wait_applied(settings, want, timeout=90)
        assert stale.alive and other.alive
        skipped = len(stale.log("offset_commit_skipped"))
        rejoined = sorted(stale.assigned())
        duplicates = sum(
            line.get("outcomes", {}).get("duplicate", 0)
            for w in (stale, other)
            for line in w.log("batch_flushed")
        )
        summary = await check(settings, want)
    assert took_over == every, f"the other worker held {sorted(took_over)} while one was frozen"
    print(
        f"injected SIGSTOP for {frozen_for:.0f}s into a worker holding {sorted(held)}, "
        f"frozen {caught}; the other took over all {len(every)} partitions; after SIGCONT the stale "
        f"worker skipped {skipped} offset commits and rejoined with {rejoined}; {duplicates} duplicates counted in "
        f"{len(load.sent)} records (the load has {want.duplicates}); all applied {waited:.1f}s "
        f"after publishing ended; checked {summary}"
    )
