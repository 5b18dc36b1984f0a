"""The outbox relay SIGKILLed in the middle of publishing a large backlog, three times.
Alerts are written in the balance change's transaction and published
at least once: every alert in Postgres reaches billing.alerts (duplicates allowed, counted),
per customer first seen in commit order, and every dead letter reaches billing.dlq."""

from __future__ import annotations

import asyncio
import functools
import random
from collections import Counter, defaultdict
from pathlib import Path

import orjson

from tests.faults.expected import Load, check, expected, wait_applied
from tests.faults.harness import (
    Producer,
    Worker,
    fault_settings,
    topic_records,
    wait_until,
    workers,
)
from tests.support import Stack, fetch, fetchval, outbox_empty, setup_pipeline
from workers.settings import Settings

CUSTOMERS = 600
KILLS = 3
# Per customer, in order: +100 (recovered), -150 (depleted), +100 (recovered),
# -100 (depleted), +200 (recovered): five alerts each.
STEPS = (("grant", 100), ("usage", 150), ("grant", 100), ("usage", 100), ("grant", 200))


def alert_storm(rng: random.Random) -> Load:
    load = Load()
    for step, (kind, tokens) in enumerate(STEPS):
        order = list(range(CUSTOMERS))
        rng.shuffle(order)
        for n in order:
            if kind == "grant":
                load.grant(f"c{n:04d}", f"g{step}", tokens)
            else:
                load.usage(f"c{n:04d}", f"u{step}", tokens)
        load.poison("usage", b"c0000", b"not json", "invalid_json")
    return load


async def test_relay_killed_mid_publish_loses_no_alert(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    broker = stack.local.broker if stack.local is not None else None
    settings = fault_settings(settings, outbox_batch_size=100)
    await setup_pipeline(settings, partitions=3)
    load = alert_storm(random.Random(8))
    want = expected(load)
    alerts_expected = sum(len(a) for a in want.alerts.values())
    with workers(settings, tmp_path) as group:
        # 1. The backlog: alerts and dead letters recorded while no relay runs.
        ingest = group.spawn("usage")
        async with Producer(settings) as producer:
            await producer.publish(settings, load.sent)
        await wait_applied(settings, want, timeout=90, settle=0)
        group.stop(ingest)
        backlog = await _unpublished(settings)
        assert backlog == alerts_expected + sum(want.dead_letters.values())

        # 2. Relays killed while they publish, at a quarter, half and three quarters; the
        #    last two while the broker is frozen (the embedded stack only).
        kills: list[int] = []
        how: list[str] = []
        relay: Worker = group.spawn("outbox")
        for k in range(1, KILLS + 1):
            target = backlog * k // (KILLS + 1)
            await wait_until(
                functools.partial(_published_at_least, settings, target),
                timeout=60,
                what=f"{target} outbox rows published",
                every=0.01,
            )
            if broker is not None and k > 1:
                # Catch it inside a page for sure: with the broker frozen, its sends are
                # written to the socket but never acknowledged, so it cannot mark them.
                broker.pause()
                try:
                    await asyncio.sleep(0.3)
                    group.kill(relay)
                finally:
                    broker.resume()
                how.append("SIGKILL awaiting acks")
            else:
                group.kill(relay)
                how.append("SIGKILL")
            kills.append(backlog - await _unpublished(settings))
            relay = group.spawn("outbox")
        drained = await wait_until(
            lambda: outbox_empty(settings), timeout=60, what="the backlog published"
        )
        leaders = len(relay.log("outbox_relay_leading"))
        summary = await check(settings, want)

    # 3. Every alert on the topic at least once; per customer, first seen in commit order.
    rows = await fetch(
        settings, "SELECT alert_id::text, customer_ref FROM alerts ORDER BY ledger_seq"
    )
    messages = await topic_records(settings, settings.topic_alerts, expected=len(rows), timeout=60)
    seen: Counter[str] = Counter()
    first_order: dict[str, list[str]] = defaultdict(list)
    for message in sorted(messages, key=lambda m: (m.partition, m.offset)):
        alert = orjson.loads(message.value)
        if not seen[alert["alert_id"]]:
            first_order[alert["customer_ref"]].append(alert["alert_id"])
        seen[alert["alert_id"]] += 1
    stored_order: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        stored_order[row["customer_ref"]].append(row["alert_id"])
    lost = {r["alert_id"] for r in rows} - set(seen)
    assert not lost, f"{len(lost)} alerts never published, e.g. {sorted(lost)[:5]}"
    assert set(seen) == {r["alert_id"] for r in rows}, "an alert on the topic but not in Postgres"
    assert first_order == stored_order, "alerts of a customer first published out of order"
    duplicates = sum(seen.values()) - len(seen)
    if "SIGKILL awaiting acks" in how:
        # A page sent but never marked is published again: proof the kill hit mid-publish.
        assert duplicates > 0, "no page was re-published after a kill awaiting acks"
    dead_letters = sum(want.dead_letters.values())
    dlq = await topic_records(settings, settings.topic_dlq, expected=dead_letters, timeout=30)
    dlq_positions = {
        (
            dict(m.headers)["chargeline.source.partition"],
            dict(m.headers)["chargeline.source.offset"],
        )
        for m in dlq
    }
    assert len(dlq_positions) == dead_letters
    print(
        f"injected {how} into the outbox relay after {kills} of {backlog} rows were "
        f"marked published; the last relay (leading {leaders}x) drained the rest in "
        f"{drained:.1f}s; {len(rows)} alerts all on billing.alerts ({len(messages)} records, "
        f"{duplicates} duplicates), in commit order per customer; {len(dlq)} records on "
        f"billing.dlq for {len(dlq_positions)} dead letters; checked {summary}"
    )
    assert len(rows) == alerts_expected


async def _unpublished(settings: Settings) -> int:
    return int(await fetchval(settings, "SELECT count(*) FROM outbox WHERE published_at IS NULL"))


async def _published_at_least(settings: Settings, n: int) -> bool:
    published = await fetchval(
        settings, "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL"
    )
    return bool(published >= n)
