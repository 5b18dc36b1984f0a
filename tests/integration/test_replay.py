"""`chargeline replay` against real servers: replaying what was applied changes
nothing, a time window applies exactly what was never processed, --dry-run reports what the
real run then does and changes nothing, and the live group's offsets never move."""

from __future__ import annotations

import asyncio
import functools
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.support import (
    assert_invariants,
    assert_one_line_error,
    charge,
    cli,
    database_state,
    fetchval,
    grant,
    group_offsets,
    ingest_done,
    log_end_offsets,
    move_group_to_end,
    outbox_empty,
    produce,
    record,
    rfc3339,
    running_worker,
    setup_pipeline,
    usage,
    wait_for,
)
from workers.kafka import client_options
from workers.ops.topic_ranges import log_ends, topic_partitions
from workers.settings import Settings


def replay(settings: Settings, *args: str) -> dict[str, Any]:
    done = cli(settings, "replay", *args, "--format", "json")
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr  # no progress lines for a short run off a terminal
    report: dict[str, Any] = orjson.loads(done.stdout)
    assert report["complete"] is True
    assert report["warnings"] == []
    return report


def verify_ok(settings: Settings) -> None:
    done = cli(settings, "verify", "--format", "json")
    assert done.returncode == 0, done.stdout
    assert orjson.loads(done.stdout)["ok"] is True


def changes_of(report: dict[str, Any]) -> dict[str, Any]:
    return report["changes"]  # type: ignore[no-any-return]


# Usage-topic load: grants, usage crossing zero both ways, a duplicate, a conflict.
USAGE_LOAD = [
    grant("c1", "g1", 100),
    usage("c1", "u1", 150),  # 100 -> -50: depleted
    grant("c1", "g2", 500),  # recovered
    usage("c2", "u2", 5),  # new customer, straight into overage
    usage("c2", "u2", 5),  # duplicate
    usage("c2", "u2", 6),  # conflict
    grant("c3", "g3", 1000),
    usage("c3", "u3", 10),
]


def charges_load() -> list[tuple[bytes | None, bytes]]:
    return [
        record(charge("flow_a", "c1", "r1", 100)),
        record(charge("flow_a", "c2", "r2", 250, currency="JPY")),
        record(charge("flow_a", "c1", "r1", 100)),  # duplicate
        record(charge("flow_a", "c1", "r1", 7)),  # conflict
        record(charge("flow_p", "c1", "p1", 100)),  # paused flow: dead letter
        record(charge("nope", "c1", "n1", 100)),  # unknown flow: dead letter
        record(b"{bad", "c1"),  # invalid json: dead letter
    ]


async def test_replaying_everything_applies_nothing_new(settings: Settings) -> None:
    await setup_pipeline(settings, partitions=3, flows=[("flow_a", "active"), ("flow_p", "paused")])
    charges = charges_load()
    async with running_worker(settings) as process:
        await produce(settings, settings.topic_usage, [record(e) for e in USAGE_LOAD])
        await produce(settings, settings.topic_charges, charges)
        total = len(USAGE_LOAD) + len(charges)
        await wait_for(functools.partial(ingest_done, process, total), what=f"{total} records")
        await wait_for(functools.partial(outbox_empty, settings), what="outbox drained")
    verify_ok(settings)
    state = await database_state(settings)
    offsets = {
        topic: await group_offsets(settings, topic)
        for topic in (settings.topic_charges, settings.topic_usage)
    }

    usage_report = replay(settings, "--topic", settings.topic_usage)
    assert {k: usage_report[k] for k in ("read", "applied", "duplicates", "conflicts")} == {
        "read": 8,
        "applied": 0,
        "duplicates": 7,
        "conflicts": 1,
    }
    assert usage_report["dead_letters"] == 0
    assert usage_report["already_dead_lettered"] == 1
    assert usage_report["by_type"]["credit_grant"] == {
        "read": 3,
        "applied": 0,
        "duplicates": 3,
        "conflicts": 0,
        "invalid": 0,
        "rejected": 0,
    }
    assert sum(p["read"] for p in usage_report["partitions"]) == 8
    assert changes_of(usage_report) == {
        "new_charges": [],
        "customers_changed": 0,
        "balance_changes": [],
        "alerts_by_type": {},
        "alerts": [],
        "reload_requests": 0,
    }

    # "charges" is the short name of the configured charges topic.
    charges_report = replay(settings, "--topic", "charges", "--from-beginning")
    assert charges_report["topic"] == settings.topic_charges
    assert {
        k: charges_report[k] for k in ("read", "applied", "duplicates", "conflicts", "dead_letters")
    } == {"read": 7, "applied": 0, "duplicates": 3, "conflicts": 1, "dead_letters": 0}
    # The conflict, the paused and unknown flows, the bad JSON: all recorded the first time.
    assert charges_report["already_dead_lettered"] == 4
    assert charges_report["rejected"] == 2 and charges_report["invalid"] == 1

    assert await database_state(settings) == state
    verify_ok(settings)
    for topic, committed in offsets.items():
        assert await group_offsets(settings, topic) == committed


async def test_log_end_is_taken_from_fetch_highwater(settings: Settings) -> None:
    """Tansu's ListOffsets answers with the last batch's base offset; the replay must still
    read to the true end (and would read short or hang if it trusted it on such a broker)."""
    await setup_pipeline(settings, partitions=1, flows=[("flow_a", "active")])
    events = [record(charge("flow_a", f"c{n % 7}", f"r{n}")) for n in range(1200)]
    await produce(settings, settings.topic_charges, events)
    consumer = AIOKafkaConsumer(group_id=None, **client_options(settings))
    await consumer.start()
    try:
        partitions = await topic_partitions(consumer, settings.topic_charges)
        consumer.assign(partitions)
        listed = await consumer.end_offsets(partitions)
        exact = await log_ends(consumer, partitions)
    finally:
        await consumer.stop()
    tp = TopicPartition(settings.topic_charges, 0)
    assert exact[tp] == 1200
    assert listed[tp] <= exact[tp]
    report = replay(settings, "--topic", "charges", "--dry-run")
    assert (report["read"], report["applied"]) == (1200, 1200)
    assert report["partitions"] == [{"partition": 0, "start": 0, "end": 1200, "read": 1200}]
    assert await fetchval(settings, "SELECT count(*) FROM charges") == 0


async def test_a_time_window_applies_exactly_what_was_never_processed(settings: Settings) -> None:
    await setup_pipeline(settings, partitions=3, flows=[("flow_a", "active")])
    before = [grant("c1", "g1", 100), grant("c2", "g2", 50), usage("c2", "u0", 10)]
    first_charges = [record(charge("flow_a", f"c{n % 3}", f"a{n}", 10 + n)) for n in range(20)]
    async with running_worker(settings) as process:
        await produce(settings, settings.topic_usage, [record(e) for e in before])
        await produce(settings, settings.topic_charges, first_charges)
        await wait_for(functools.partial(ingest_done, process, 23), what="the first load")
        await wait_for(functools.partial(outbox_empty, settings), what="outbox drained")
    verify_ok(settings)

    # Published while the workers are stopped...
    await asyncio.sleep(0.05)
    since = datetime.now(UTC)
    await asyncio.sleep(0.05)
    missed_usage = [
        usage("c1", "u1", 150),  # c1: 100 -> -50, depleted
        grant("c1", "g3", 1000),  # recovered
        usage("c2", "u2", 5),
        usage("c4", "u4", 1),  # a new customer, into overage
    ]
    missed_charges = [record(charge("flow_a", f"c{n % 4}", f"b{n}", 100 + n)) for n in range(30)]
    await produce(settings, settings.topic_usage, [record(e) for e in missed_usage])
    await produce(settings, settings.topic_charges, missed_charges)
    await asyncio.sleep(0.05)
    after_missed = datetime.now(UTC)
    # ...and the live group moved past them, as an offset reset would.
    await move_group_to_end(settings, settings.topic_usage, settings.topic_charges)
    async with running_worker(settings) as process:
        await wait_for(
            functools.partial(_assigned, process), what="the live worker to take its partitions"
        )
        await asyncio.sleep(1.5)
        assert process.ingest is not None
        assert process.ingest.totals.records == 0  # the live group skips them
    state = await database_state(settings)
    offsets = await group_offsets(settings, settings.topic_usage)

    # A window before the gap holds only what was applied.
    old = replay(settings, "--topic", "usage", "--since", "2000-01-01", "--until", rfc3339(since))
    assert (old["read"], old["applied"], old["duplicates"]) == (3, 0, 3)

    dry = replay(settings, "--topic", "usage", "--since", rfc3339(since), "--dry-run")
    assert dry["dry_run"] is True
    assert (dry["read"], dry["applied"], dry["duplicates"]) == (4, 4, 0)
    assert await database_state(settings) == state  # rolled back

    real = replay(settings, "--topic", "usage", "--since", rfc3339(since))
    assert (real["read"], real["applied"], real["duplicates"]) == (4, 4, 0)
    assert changes_of(real) == changes_of(dry)
    assert changes_of(real)["balance_changes"] == [
        {"customer_ref": "c1", "before": 100, "after": 950, "change": 850},
        {"customer_ref": "c2", "before": 40, "after": 35, "change": -5},
        {"customer_ref": "c4", "before": 0, "after": -1, "change": -1},
    ]
    # c4 starts at 0: going below is no crossing from > 0 (SPEC.md section 5).
    assert [(a["customer_ref"], a["type"]) for a in changes_of(real)["alerts"]] == [
        ("c1", "credit_balance_depleted"),
        ("c1", "credit_balance_recovered"),
    ]

    window = ("--since", rfc3339(since), "--until", rfc3339(after_missed))
    dry_charges = replay(settings, "--topic", "charges", *window, "--dry-run")
    real_charges = replay(settings, "--topic", "charges", *window)
    for report in (dry_charges, real_charges):
        assert (report["read"], report["applied"], report["duplicates"]) == (30, 30, 0)
    assert changes_of(real_charges) == changes_of(dry_charges)
    assert changes_of(real_charges)["new_charges"] == [
        {
            "flow_id": "flow_a",
            "currency": "EUR",
            "count": 30,
            "amount": sum(100 + n for n in range(30)),
        }
    ]

    assert await fetchval(settings, "SELECT count(*) FROM charges") == 50
    assert await fetchval(settings, "SELECT count(*) FROM usage_events") == 4
    await assert_invariants(settings)
    verify_ok(settings)
    assert await group_offsets(settings, settings.topic_usage) == offsets
    # Again: nothing left to apply.
    again = replay(settings, "--topic", "usage", "--since", rfc3339(since))
    assert (again["applied"], again["duplicates"]) == (0, 4)


async def _assigned(process: Any) -> bool:
    return process.ingest is not None and bool(process.ingest.consumer.assignment())


async def test_offset_ranges_and_bad_ranges(settings: Settings) -> None:
    await setup_pipeline(settings, partitions=2, flows=[("flow_a", "active")])
    await produce(
        settings,
        settings.topic_charges,
        [record(charge("flow_a", f"c{n}", f"r{n}")) for n in range(40)],
    )
    ends = await log_end_offsets(settings, settings.topic_charges)
    assert sum(ends.values()) == 40
    busy = max(ends, key=lambda p: ends[p])
    report = replay(
        settings,
        "--topic",
        "charges",
        "--from-offsets",
        f"{busy}:2",
        "--to-offsets",
        f"{busy}:5",
        "--dry-run",
    )
    assert report["partitions"] == [{"partition": busy, "start": 2, "end": 5, "read": 3}]
    assert report["applied"] == 3
    until_now = replay(settings, "--topic", "charges", "--until", "now")
    assert until_now["applied"] == 40
    future = replay(settings, "--topic", "charges", "--since", "2999-01-01")
    assert (future["read"], future["applied"]) == (0, 0)
    assert all(p["start"] == p["end"] == ends[p["partition"]] for p in future["partitions"])

    assert_one_line_error(
        cli(settings, "replay", "--topic", settings.topic_alerts), code=2, mentions="not an input"
    )
    assert_one_line_error(
        cli(settings, "replay", "--topic", "charges", "--from-offsets", "9:0"),
        code=2,
        mentions="no partition 9",
    )
    assert_one_line_error(
        cli(settings, "replay", "--topic", "charges", "--from-offsets", f"{busy}:{ends[busy] + 1}"),
        code=2,
        mentions="beyond the log end",
    )
    assert_one_line_error(
        cli(settings, "replay", "--topic", "charges", "--from-offsets", "0=1"),
        code=2,
        mentions="PARTITION:OFFSET",
    )
    assert_one_line_error(
        cli(
            settings,
            "replay",
            "--topic",
            "charges",
            "--since",
            "2020-01-02",
            "--until",
            "2020-01-01",
        ),
        code=2,
        mentions="--since must not be after --until",
    )
    assert_one_line_error(
        cli(
            settings,
            "replay",
            "--topic",
            "charges",
            "--since",
            "2020-01-01",
            "--from-offsets",
            "0:1",
        ),
        code=2,
        mentions="--since or --from-offsets",
    )
    assert_one_line_error(
        cli(settings, "replay", "--topic", "charges", "--since", "0:1", "--from-offsets", "0:2"),
        code=2,
        mentions="give the start once",
    )
    assert_one_line_error(
        cli(settings, "replay", "--topic", "charges", "--since", "160"),
        code=2,
        mentions="PARTITION:OFFSET",
    )


async def test_publish_with_a_rate_limit(settings: Settings, tmp_path: Path) -> None:
    await setup_pipeline(settings, partitions=2, flows=[("flow_a", "active")])
    lines = [orjson.dumps(charge("flow_a", f"c{n % 9}", f"r{n}")).decode() for n in range(1500)]
    path = tmp_path / "backfill.jsonl"
    path.write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    done = cli(settings, "publish", "charges", str(path), "--rate", "1000", "--format", "json")
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    assert report["published"] == 1500 and report["by_type"] == {"charge": 1500}
    # A burst of a tenth of a second, then 1000/s: at least 1.4 s of publishing.
    assert report["seconds"] >= 1.3, report
    assert elapsed >= 1.3
    assert sum((await log_end_offsets(settings, settings.topic_charges)).values()) == 1500


async def test_a_record_the_apply_step_fails_on_neither_stops_nor_spoils_a_replay(
    settings: Settings,
) -> None:
    """A replay meets what the live workers would isolate: the dry run stops there and says
    why in one line; the real run applies that batch lane by lane, the record to blame
    dead-lettered ``unprocessable``, the others recorded, and says so."""
    await setup_pipeline(settings, partitions=1, flows=[("flow_a", "active")])
    conn = await asyncpg.connect(settings.dsn)
    try:
        await conn.execute(
            "ALTER TABLE charges ADD CONSTRAINT planted CHECK (reference <> 'poison-pg')"
        )
    finally:
        await conn.close()
    charges = [record(charge("flow_a", "c1", f"ok-{n}")) for n in range(6)]
    charges.insert(3, record(charge("flow_a", "c1", "poison-pg")))
    await produce(settings, settings.topic_charges, charges)

    def run(*args: str) -> dict[str, Any]:
        done = cli(settings, "replay", "--topic", "charges", *args, "--format", "json")
        assert done.returncode == 0, done.stderr
        report: dict[str, Any] = orjson.loads(done.stdout)
        assert report["complete"] is True
        return report

    dry = cli(settings, "replay", "--topic", "charges", "--dry-run", "--format", "json")
    assert_one_line_error(dry, code=1, mentions="dry run stopped: a batch")
    assert "failed on its records (CheckViolationError" in dry.stderr
    assert await fetchval(settings, "SELECT count(*) FROM charges") == 0

    real = run()
    assert any("applied lane by lane" in w for w in real["warnings"]), real["warnings"]
    assert (real["read"], real["applied"], real["dead_letters"]) == (7, 6, 1)
    assert await fetchval(settings, "SELECT count(*) FROM charges") == 6
    assert (
        await fetchval(settings, 'SELECT reason FROM dead_letters WHERE "offset" = 3')
        == "unprocessable"
    )
    verify_ok(settings)
