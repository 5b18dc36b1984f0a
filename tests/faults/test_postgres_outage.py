"""Postgres failing under the workers: their connections killed with
pg_terminate_backend again and again, mid-transaction; and the server stopped for 15 s
and started again while records keep arriving. The workers back off and retry (an outage
is never a dead letter), stay alive with their memory bounded, resume by themselves, and
every event is applied exactly once."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path

import asyncpg
import pytest

from tests.faults.expected import check, expected, mixed_load, wait_applied
from tests.faults.harness import (
    Producer,
    fault_settings,
    frozen,
    publish_paced,
    wait_until,
    workers,
)
from tests.support import Stack, outbox_empty, setup_pipeline
from workers.settings import Settings

MIB = 1 << 20
OUTAGE_S = 15
KILLING_S = 8
KINDS = ("charges", "usage", "outbox")

# The workers' sessions (the tests' own connections set no application_name), those in a
# transaction only, or all of them.
KILL_WORKER_BACKENDS = """
SELECT state, pg_terminate_backend(pid) AS killed
FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND application_name = 'chargeline'
  AND ($1 OR state IN ('active', 'idle in transaction'))
"""


async def test_backends_terminated_mid_transaction_lose_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    settings = fault_settings(settings, batch_max_records=200)
    await setup_pipeline(settings, partitions=3, flows=[("flow_a", "active")])
    rng = random.Random(4)
    load = mixed_load(rng, 3_000)
    killed: Counter[str] = Counter()
    with workers(settings, tmp_path) as group:
        first, second = group.spawn(*KINDS), group.spawn(*KINDS)
        async with Producer(settings) as producer:
            publishing = asyncio.create_task(
                publish_paced(producer, settings, load.sent, seconds=KILLING_S, slices=40)
            )
            admin = await asyncpg.connect(settings.dsn)  # no application_name: not a target
            try:
                polls = 0
                while not publishing.done():
                    # Every 20 ms a third of the transactions caught are killed; every
                    # second every session is, idle ones and the relay's included.
                    polls += 1
                    everyone = polls % 50 == 0
                    if everyone or rng.random() < 1 / 3:
                        for row in await admin.fetch(KILL_WORKER_BACKENDS, everyone):
                            killed[row["state"] or "starting"] += bool(row["killed"])
                    await asyncio.sleep(0.02)
            finally:
                await admin.close()
            await publishing
        want = expected(load)
        waited = await wait_applied(settings, want, timeout=90)
        await wait_until(lambda: outbox_empty(settings), timeout=30, what="outbox published")
        assert first.alive and second.alive, "a worker died of a killed connection"
        retries = Counter(
            line.get("component") for w in (first, second) for line in w.log("retrying")
        )
        summary = await check(settings, want)
    in_transaction = killed["active"] + killed["idle in transaction"]
    assert in_transaction > 0, f"no backend was caught in a transaction: {dict(killed)}"
    print(
        f"injected {sum(killed.values())} pg_terminate_backend over {KILLING_S} s ({dict(killed)}; "
        f"{in_transaction} mid-transaction) into 2 workers; they retried {dict(retries)}; "
        f"applied {waited:.1f}s after the last kill; checked {summary}; outbox drained"
    )


async def test_postgres_stopped_for_15s_workers_wait_bounded_and_resume(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    if stack.local is None:
        pytest.skip("needs the embedded stack to stop and start Postgres")
    postgres = stack.local.postgres
    settings = fault_settings(settings, batch_max_records=500)
    await setup_pipeline(settings, partitions=3, flows=[("flow_a", "active")])
    load = mixed_load(random.Random(5), 8_000)
    before, during = load.sent[:2_000], load.sent[2_000:]
    with workers(settings, tmp_path) as group:
        worker = group.spawn(*KINDS)
        async with Producer(settings) as producer:
            await producer.publish(settings, before)
            await wait_applied(settings, expected(before), timeout=60, settle=0)
            baseline = worker.rss_bytes()
            samples: list[int] = []
            stopped_at = time.monotonic()
            await asyncio.to_thread(postgres.stop)
            try:
                assert postgres.pid is None
                publishing = asyncio.create_task(
                    publish_paced(producer, settings, during, seconds=OUTAGE_S * 0.7, slices=40)
                )
                while time.monotonic() - stopped_at < OUTAGE_S:
                    samples.append(worker.rss_bytes())
                    await asyncio.sleep(0.5)
                await publishing
                assert worker.alive, "the worker died while Postgres was down"
            finally:
                if postgres.pid is None:
                    await asyncio.to_thread(postgres.start_again)
            down_for = time.monotonic() - stopped_at
        want = expected(load)
        resumed = await wait_applied(settings, want, timeout=60)
        await wait_until(lambda: outbox_empty(settings), timeout=30, what="outbox published")
        assert worker.alive
        retries = Counter(line.get("component") for line in worker.log("retrying"))
        assert retries["postgres"] > 0, f"no Postgres retries logged: {dict(retries)}"
        summary = await check(settings, want)
    peak = max(samples)
    limit = baseline * 1.5 + 50 * MIB
    assert peak < limit, f"RSS grew from {baseline / MIB:.0f} to {peak / MIB:.0f} MiB"
    print(
        f"injected a Postgres stop of {down_for:.1f}s while {len(during)} records were "
        f"published; worker RSS {baseline / MIB:.0f} MiB before, at most {peak / MIB:.0f} MiB "
        f"during (limit {limit / MIB:.0f}); retries {dict(retries)}; everything applied "
        f"{resumed:.1f}s after the restart; checked {summary}; outbox drained"
    )


async def test_postgres_frozen_under_a_worker_is_reported_while_it_lasts(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    """A Postgres that answers nothing (SIGSTOP: no refused connection, no error) leaves a
    lane's statement waiting, so no retry says it. The lane watchdog asks Postgres once a
    lane has waited: the worker logs postgres_not_answering and is not ready while it
    lasts, then postgres_answering_again, and every event is applied once."""
    if stack.local is None or stack.local.postgres.pid is None:
        pytest.skip("needs the embedded stack to freeze Postgres")
    settings = fault_settings(settings, batch_max_records=200, lane_stall_timeout_s=4)
    await setup_pipeline(settings, partitions=3, flows=[("flow_a", "active")])
    load = mixed_load(random.Random(6), 3_000)
    before, during = load.sent[:1_000], load.sent[1_000:]
    with workers(settings, tmp_path) as group:
        worker = group.spawn("charges", "usage", metrics=True)
        async with Producer(settings) as producer:
            await producer.publish(settings, before)
            await wait_applied(settings, expected(before), timeout=60, settle=0)
            with frozen(stack.local.postgres.pid):
                await producer.publish(settings, during)
                await wait_until(
                    lambda: worker.log("postgres_not_answering"),
                    timeout=40,
                    what="postgres_not_answering",
                )
                assert not worker.ready(), "/readyz answered 200 while Postgres did not"
                assert worker.metric("chargeline_worker_ready") == 0
                assert not worker.log("lane_stalled"), "an outage is not a stall"
        await wait_applied(settings, expected(load.sent), timeout=60)
        await wait_until(
            lambda: worker.log("postgres_answering_again"),
            timeout=30,
            what="postgres_answering_again",
        )
        assert worker.ready() and worker.metric("chargeline_worker_ready") == 1
        summary = await check(settings, expected(load.sent))
    (reported,) = worker.log("postgres_not_answering")
    print(f"a frozen Postgres was reported after {reported['waiting_s']}s; checked {summary}")
