"""SIGKILL a worker process in the middle of a load, again and again: nothing is lost,
nothing applied twice."""

from __future__ import annotations

import asyncio
import functools
import random
import signal
from pathlib import Path

from tests.support import (
    KILLED_MEMBER_SESSION_MS,
    assert_invariants,
    charge,
    fetchval,
    produce,
    record,
    settings_env,
    setup_pipeline,
    spawn_worker,
    wait_for,
)
from workers.settings import Settings

EVENTS = 20_000
KILLS = 3


async def test_sigkill_mid_load_loses_and_duplicates_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    rng = random.Random(8)
    await setup_pipeline(settings, partitions=3, flows=[("flow_a", "active")])
    unique = [
        charge("flow_a", f"c{rng.randint(1, 300)}", f"r{n}", rng.randint(1, 999))
        for n in range(EVENTS)
    ]
    poison = [record(b"{broken", key="c1") for _ in range(20)]
    records = [record(e) for e in unique] + [record(e) for e in rng.sample(unique, 1000)] + poison
    rng.shuffle(records)
    env = settings_env(
        settings.model_copy(
            update={"batch_max_records": 500, "kafka_session_timeout_ms": KILLED_MEMBER_SESSION_MS}
        )
    )
    log = str(tmp_path / "worker.log")

    await produce(settings, settings.topic_charges, records)
    kills = 0
    worker = spawn_worker(env, "charges", log_path=log)
    try:
        for kills in range(1, KILLS + 1):
            target = EVENTS * kills // (KILLS + 1)
            await wait_for(
                functools.partial(_charges_at_least, settings, target),
                timeout=120,
                what=f"{target} charges",
            )
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=10)
            worker = spawn_worker(env, "charges", log_path=log)
        await wait_for(lambda: _charges_at_least(settings, EVENTS), timeout=180, what="all charges")
        await wait_for(
            lambda: _dead_letters_at_least(settings, 20), timeout=60, what="dead letters"
        )
        await asyncio.sleep(1)  # let anything still in flight land, so extra rows would show
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
    charges = await fetchval(settings, "SELECT count(*) FROM charges")
    distinct = await fetchval(settings, "SELECT count(DISTINCT (flow_id, reference)) FROM charges")
    dead = await fetchval(settings, "SELECT count(*) FROM dead_letters")
    total = await fetchval(settings, "SELECT sum(amount) FROM charges")
    print(
        f"injected {kills} SIGKILLs into a load of {len(records)} records; "
        f"checked charges={charges} distinct={distinct} dead_letters={dead}"
    )
    assert charges == distinct == EVENTS
    assert total == sum(e["amount"] for e in unique)
    assert dead == 20
    assert await fetchval(settings, "SELECT count(*) FROM outbox WHERE kind = 'dead_letter'") == 20
    await assert_invariants(settings)


async def _charges_at_least(settings: Settings, n: int) -> bool:
    return bool(await fetchval(settings, "SELECT count(*) >= $1 FROM charges", n))


async def _dead_letters_at_least(settings: Settings, n: int) -> bool:
    return bool(await fetchval(settings, "SELECT count(*) >= $1 FROM dead_letters", n))
