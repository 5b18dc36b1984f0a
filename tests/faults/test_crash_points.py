"""A worker SIGKILLed exactly between the database commit and the offset commit, and just
before the database commit, every few batches until a mixed load is through: every
valid event applied once, every invalid one dead-lettered once.

These are the tests that fail if offsets were committed before the database commit
(crash_before_db_commit loses the batch) or if the dedup keys were dropped
(crash_after_db_commit applies the redelivered batch twice)."""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    KILLED_MEMBER_SESSION_MS,
    assert_invariants,
    charge,
    fetch,
    fetchval,
    grant,
    produce,
    record,
    settings_env,
    setup_pipeline,
    spawn_worker,
    usage,
)
from workers.settings import Settings

CHARGES = 3_000
USAGE = 3_000
POISON = 30


def mixed_load(
    rng: random.Random,
) -> tuple[list[tuple[bytes | None, bytes]], list[tuple[bytes | None, bytes]], dict[str, int]]:
    charges = [
        record(charge("flow_a", f"c{rng.randrange(50)}", f"r{n}", rng.randint(1, 900)))
        for n in range(CHARGES)
    ]
    charges += [charges[rng.randrange(CHARGES)] for _ in range(300)]  # exact duplicates
    charges += [record(b'{"type": "charge", "amount": ', "c1") for _ in range(POISON)]
    rng.shuffle(charges)
    balances: dict[str, int] = defaultdict(int)
    events: list[dict[str, Any]] = [grant(f"c{n}", f"g{n}", 10_000) for n in range(50)]
    for n in range(USAGE):
        events.append(usage(f"c{rng.randrange(50)}", f"u{n}", rng.randint(1, 300)))
    for event in events:
        balances[event["customer_ref"]] += (
            event["tokens"] if event["type"] == "credit_grant" else -event["tokens"]
        )
    return charges, [record(e) for e in events], dict(balances)


@pytest.mark.parametrize("point", ["crash_after_db_commit", "crash_before_db_commit"])
async def test_crash_at_commit_points_applies_everything_once(
    settings: Settings, tmp_path: Path, point: str
) -> None:
    rng = random.Random(11)
    await setup_pipeline(settings, partitions=3, flows=[("flow_a", "active")])
    charges, usage_records, balances = mixed_load(rng)
    await produce(settings, settings.topic_charges, charges)
    await produce(settings, settings.topic_usage, usage_records)
    crashing = settings.model_copy(
        update={
            "batch_max_records": 600,
            "failpoint": f"{point}:3",
            "kafka_session_timeout_ms": KILLED_MEMBER_SESSION_MS,
        }
    )
    env = settings_env(crashing)
    log = str(tmp_path / "worker.log")

    crashes = 0
    deadline = time.monotonic() + 240
    worker = spawn_worker(env, "charges", "usage", log_path=log)
    try:
        while time.monotonic() < deadline:
            if await _all_applied(settings):
                break
            if worker.poll() is not None:  # the failpoint killed it: start another
                crashes += 1
                worker = spawn_worker(env, "charges", "usage", log_path=log)
            await asyncio.sleep(0.2)
        else:
            raise AssertionError(f"load not applied after {crashes} crashes")
    finally:
        worker.kill()
        worker.wait(timeout=30)

    charge_rows = await fetchval(settings, "SELECT count(*) FROM charges")
    usage_rows = await fetchval(settings, "SELECT count(*) FROM usage_events")
    dead = await fetchval(settings, "SELECT count(*) FROM dead_letters")
    observed = {
        r["customer_ref"]: r["balance"]
        for r in await fetch(settings, "SELECT customer_ref, balance FROM customers")
    }
    print(
        f"{point}: {crashes} SIGKILLs at that point; checked charges={charge_rows} "
        f"usage={usage_rows} dead_letters={dead} balances={len(observed)}"
    )
    assert crashes >= 3, "the failpoint should have fired several times"
    assert charge_rows == CHARGES
    assert usage_rows == USAGE
    assert dead == POISON
    assert observed == balances
    await assert_invariants(settings)


async def _all_applied(settings: Settings) -> bool:
    done = await fetchval(
        settings,
        "SELECT (SELECT count(*) FROM charges) = $1 AND (SELECT count(*) FROM usage_events) = $2 "
        "AND (SELECT count(*) FROM dead_letters) = $3",
        CHARGES, USAGE, POISON,
    )  # fmt: skip
    return bool(done)
