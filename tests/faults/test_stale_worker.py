"""A worker frozen (SIGSTOP) past its session timeout, preferably in the middle of its
database transaction, while another member takes its partitions; then thawed (SIGCONT).
The stale worker finishes the batch it held, tries to commit offsets
for partitions it no longer owns and joins the group again; whatever it applies, nothing
is applied twice and nothing is lost."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from pathlib import Path

from tests.faults.expected import check, expected, mixed_load, wait_applied
from tests.faults.harness import (
    Producer,
    Worker,
    fault_settings,
    publish_paced,
    signal_in_transaction,
    wait_until,
    workers,
)
from tests.support import setup_pipeline
from workers.settings import Settings

PARTITIONS = 4
EVENTS = 4_000
PUBLISH_S = 10  # about as long as the join, the freeze and the rejoin take
DWELL_S = 1.5  # the frozen worker stays frozen this long after the other took over


async def test_stale_worker_after_sigstop_applies_nothing_twice(
    settings: Settings, tmp_path: Path
) -> None:
    settings = fault_settings(settings, batch_max_records=200)
    await setup_pipeline(settings, partitions=PARTITIONS, flows=[("flow_a", "active")])
    load = mixed_load(random.Random(2), EVENTS)
    session_ms = settings.kafka_session_timeout_ms
    every = {f"{t}[{p}]" for t in (settings.topic_charges, settings.topic_usage)
             for p in range(PARTITIONS)}  # fmt: skip
    with workers(settings, tmp_path) as group:
        stale, other = group.spawn("charges", "usage"), group.spawn("charges", "usage")
        async with Producer(settings) as producer:
            publishing = asyncio.create_task(
                publish_paced(producer, settings, load.sent, seconds=PUBLISH_S, slices=100)
            )
            await wait_until(
                lambda: stale.assigned() and other.assigned() and stale.log("batch_flushed"),
                timeout=30,
                what="both workers consuming",
            )
            caught = await signal_in_transaction(settings, stale, signal.SIGSTOP, within=5)
            frozen_at = time.monotonic()
            held = stale.assigned()
            # Frozen past its session timeout, until the other member holds every partition
            # and has had a moment to fetch (and, where the frozen transaction holds no lock
            # it needs, apply) later records of them; then thawed.
            await asyncio.sleep(session_ms / 1000)
            await wait_until(
                lambda: other.assigned() == every, timeout=30, what="the other to take over"
            )
            took_over = other.assigned()
            await asyncio.sleep(DWELL_S)
            frozen_for = time.monotonic() - frozen_at
            stale.signal(signal.SIGCONT)
            # Thawed, it finishes its batch, is refused its offset commits and joins again.
            assignments = len(stale.log("partitions_assigned"))
            rejoined_in = await wait_until(
                lambda: _assigned_since(stale, assignments),
                timeout=60,
                what="the stale worker to rejoin the group",
            )
            await publishing
        want = expected(load)
        waited = await wait_applied(settings, want, timeout=90)
        assert stale.alive and other.alive
        skipped = len(stale.log("offset_commit_skipped"))
        duplicates = sum(
            line.get("outcomes", {}).get("duplicate", 0)
            for w in (stale, other)
            for line in w.log("batch_flushed")
        )
        summary = await check(settings, want)
    assert took_over == every, f"the other worker held {sorted(took_over)} while one was frozen"
    print(
        f"injected SIGSTOP for {frozen_for:.1f}s (session timeout {session_ms} ms) into a "
        f"worker holding {sorted(held)}, frozen {caught}; the other took over all {len(every)} "
        f"partitions; after SIGCONT the stale "
        f"worker skipped {skipped} offset commits and rejoined {rejoined_in:.1f}s after SIGCONT; {duplicates} duplicates counted in "
        f"{len(load.sent)} records (the load has {want.duplicates}); all applied {waited:.1f}s "
        f"after publishing ended; checked {summary}"
    )


def _assigned_since(worker: Worker, before: int) -> bool:
    """``worker`` logged a non-empty assignment after its first ``before`` ones."""
    return any(line.get("partitions") for line in worker.log("partitions_assigned")[before:])
