"""The same events delivered again: every applied event re-published
with its reference at a new offset, and the live consumer group reset to the beginning
(offset 0 committed for every partition, the same group), so the workers read the whole
history and the copies once more. Nothing changes: row counts, sums, balances, alerts,
dead letters and outbox rows are identical; the metrics count the re-reads as duplicates."""

from __future__ import annotations

import random
from pathlib import Path

from tests.faults.expected import applied, check, expected, mixed_load, wait_applied
from tests.faults.harness import (
    Producer,
    commit_group_offsets,
    committed_offsets,
    fault_settings,
    wait_until,
    workers,
)
from tests.support import database_state, outbox_empty, setup_pipeline
from workers.settings import Settings

EVENTS = 3_000
KINDS = ("charges", "usage", "outbox")


async def test_republished_references_and_group_reset_change_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    settings = fault_settings(settings)
    await setup_pipeline(settings, partitions=3, flows=[("flow_a", "active")])
    load = mixed_load(random.Random(7), EVENTS, conflicts=0.005)
    want = expected(load)
    copies = applied(load)
    inputs = [settings.topic_charges, settings.topic_usage]
    with workers(settings, tmp_path) as group:
        first = group.spawn(*KINDS)
        async with Producer(settings) as producer:
            await producer.publish(settings, load.sent)
            await wait_applied(settings, want, timeout=60, settle=0)
            await wait_until(lambda: outbox_empty(settings), timeout=30, what="outbox published")
            before = await database_state(settings)
            stopped_in = group.stop(first)
            await producer.publish(settings, copies)
        partitions = await commit_group_offsets(settings, inputs, 0)
        reset = await committed_offsets(settings, inputs)
        assert set(reset.values()) == {0}, reset

        again = group.spawn(*KINDS, metrics=True)
        total = len(load.sent) + len(copies)
        reread = await wait_until(
            lambda: again.ready() and again.metric("chargeline_events_total") >= total,
            timeout=90,
            what="the whole history read again",
        )
        await wait_until(lambda: outbox_empty(settings), timeout=30, what="outbox published")
        outcomes = {
            outcome: int(again.metric("chargeline_events_total", outcome=outcome))
            for outcome in ("recorded", "duplicate", "conflict", "invalid", "rejected")
        }
        dead_letters = int(again.metric("chargeline_dead_letters_total"))
        after = await database_state(settings)
        summary = await check(settings, want)
        ends = await committed_offsets(settings, inputs)
    assert after == before
    # Every event read again is a duplicate of itself, every copy a duplicate of the first;
    # conflicts and invalid records stay what they were, recorded once already.
    assert outcomes == {
        "recorded": 0,
        "duplicate": want.duplicates + 2 * len(copies),
        "conflict": want.conflicts,
        "invalid": want.dead_letters["invalid_json"],
        "rejected": 0,
    }, outcomes
    assert dead_letters == 0
    print(
        f"injected {len(copies)} re-published events and a reset of the group to offset 0 "
        f"on {partitions} partitions (first worker drained in {stopped_in:.1f}s); the "
        f"restarted worker re-read {total} records in {reread:.1f}s: {outcomes}, 0 new dead "
        f"letters; committed offsets now {sorted(ends.values())}; database unchanged "
        f"({ {k: v for k, v in before.items() if k != 'balances'} } and balances); "
        f"checked {summary}"
    )
