"""Three worker processes in one group, members killed and added during a usage load:
every balance equals its ledger sum and an independently computed value, and the alerts
are exactly the sign crossings of that value."""

from __future__ import annotations

import asyncio
import functools
import random
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from tests.support import (
    KILLED_MEMBER_SESSION_MS,
    assert_invariants,
    fetch,
    fetchval,
    grant,
    produce,
    record,
    settings_env,
    setup_pipeline,
    spawn_worker,
    usage,
    wait_for,
)
from workers.settings import Settings

CUSTOMERS = 200
EVENTS = 12_000


def build_load(rng: random.Random) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for n in range(EVENTS):
        customer = f"c{rng.randrange(CUSTOMERS):03d}"
        if rng.random() < 0.08:
            events.append(grant(customer, f"g{n}", rng.randint(100, 3_000)))
        else:
            events.append(usage(customer, f"u{n}", rng.randint(1, 120)))
    return events


def expected_state(events: list[dict[str, Any]]) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Balances and crossing alerts from first principles: per customer, in order, the
    balance moves by +grant / -usage; an alert fires when its sign side changes."""
    balance: dict[str, int] = defaultdict(int)
    alerts: dict[str, list[str]] = defaultdict(list)
    for event in events:
        customer = event["customer_ref"]
        before = balance[customer]
        delta = event["tokens"] if event["type"] == "credit_grant" else -event["tokens"]
        after = balance[customer] = before + delta
        if before > 0 >= after:
            alerts[customer].append("credit_balance_depleted")
        elif before <= 0 < after:
            alerts[customer].append("credit_balance_recovered")
    return dict(balance), dict(alerts)


async def test_three_workers_with_rebalances_keep_every_balance_exact(
    settings: Settings, tmp_path: Path
) -> None:
    rng = random.Random(3)
    await setup_pipeline(settings, partitions=6)
    events = build_load(rng)
    env = settings_env(
        settings.model_copy(
            update={"batch_max_records": 300, "kafka_session_timeout_ms": KILLED_MEMBER_SESSION_MS}
        )
    )
    log = str(tmp_path / "workers.log")
    workers = [spawn_worker(env, "usage", log_path=log) for _ in range(3)]
    injected: list[str] = []
    try:
        # Publish in slices while members come and go.
        slices = [events[i : i + 2_000] for i in range(0, len(events), 2_000)]
        for n, part in enumerate(slices):
            await produce(settings, settings.topic_usage, [record(e) for e in part])
            await asyncio.sleep(1.5)
            victim = workers.pop(n % len(workers))
            how = signal.SIGKILL if n % 2 else signal.SIGTERM
            victim.send_signal(how)
            started = time.monotonic()
            victim.wait(timeout=40)
            injected.append(f"{how.name} ({time.monotonic() - started:.1f}s to exit)")
            workers.append(spawn_worker(env, "usage", log_path=log))
        await wait_for(
            functools.partial(_applied, settings, len(events)),
            timeout=240,
            what="every usage and grant applied",
        )
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            try:
                worker.wait(timeout=40)
            except subprocess.TimeoutExpired:
                injected.append("worker ignored SIGTERM for 40s")
                worker.kill()
                worker.wait()

    balances, crossings = expected_state(events)
    rows = await fetch(
        settings,
        "SELECT c.customer_ref, c.balance, coalesce(sum(e.amount), 0) AS ledger "
        "FROM customers c LEFT JOIN ledger_entries e USING (customer_ref) GROUP BY 1, 2",
    )
    assert {r["customer_ref"]: r["balance"] for r in rows} == balances
    assert all(r["balance"] == r["ledger"] for r in rows)
    alert_rows = await fetch(
        settings, "SELECT customer_ref, type FROM alerts ORDER BY customer_ref, ledger_seq"
    )
    observed: dict[str, list[str]] = defaultdict(list)
    for row in alert_rows:
        observed[row["customer_ref"]].append(row["type"])
    assert dict(observed) == crossings
    await assert_invariants(settings)
    usage_rows = await fetchval(settings, "SELECT count(*) FROM usage_events")
    print(
        f"injected {injected} into 3 usage workers over {len(events)} events; checked "
        f"{len(rows)} balances, {len(alert_rows)} alerts, {usage_rows} usage rows"
    )


async def _applied(settings: Settings, n: int) -> bool:
    count = await fetchval(
        settings, "SELECT (SELECT count(*) FROM usage_events) + (SELECT count(*) FROM grants)"
    )
    return bool(count >= n)
