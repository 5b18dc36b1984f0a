"""A rebalance storm: while a mixed load streams in, a worker process is
added, SIGTERMed or SIGKILLed every second and a half, so the group is rebalancing most of
the time and partitions keep moving between members mid-batch. Afterwards every valid
event is applied once, every invalid one dead-lettered once, balances and alerts exact."""

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
    workers,
)
from tests.support import setup_pipeline
from workers.settings import Settings

EVENTS = 5_000
STORM_S = 12
EVERY_S = 1.5  # a join takes about 2 s: the group is rebalancing nearly all the time
MAX_WORKERS = 4


async def test_rebalance_storm_applies_everything_once(settings: Settings, tmp_path: Path) -> None:
    rng = random.Random(33)
    settings = fault_settings(settings, batch_max_records=250)
    await setup_pipeline(settings, partitions=6, flows=[("flow_a", "active")])
    load = mixed_load(rng, EVENTS, customers=120)
    injected: list[str] = []
    with workers(settings, tmp_path) as group:
        for _ in range(2):
            group.spawn("charges", "usage")
        async with Producer(settings) as producer:
            publishing = asyncio.create_task(
                publish_paced(producer, settings, load.sent, seconds=STORM_S, slices=90)
            )
            while not publishing.done():
                await asyncio.sleep(EVERY_S)
                running = group.running
                roll = rng.random()
                if len(running) < 2 or (roll < 0.45 and len(running) < MAX_WORKERS):
                    group.spawn("charges", "usage")
                    injected.append("add")
                elif roll < 0.75:
                    # Killed inside a transaction when one is caught within a second.
                    where = await signal_in_transaction(
                        settings, rng.choice(running), signal.SIGKILL, within=1
                    )
                    injected.append(f"SIGKILL {where.split(' (')[0]}")
                else:
                    # Never wait here: a SIGTERMed member drains while the storm goes on.
                    rng.choice(running).signal(signal.SIGTERM)
                    injected.append("SIGTERM")
            await publishing
        if len(group.running) < 2:
            group.spawn("charges", "usage")
        want = expected(load)
        waited = await wait_applied(settings, want, timeout=120)
        summary = await check(settings, want)
        survivors = len(group.running)
    print(
        f"injected {len(injected)} membership changes in {STORM_S}s ({', '.join(injected)}; "
        f"{group.spawned} processes in all, {survivors} at the end) into {len(load.sent)} "
        f"records; applied {waited:.1f}s after publishing ended; checked {summary}"
    )
