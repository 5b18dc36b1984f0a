"""`chargeline dlq list|replay`: dead letters of a paused flow, replayed after the
flow is resumed, become charges once; a second replay does nothing, and two replays at once
share the work without publishing anything twice."""

from __future__ import annotations

import asyncio
import functools
import os
import sys
from typing import Any

import orjson

from tests.support import (
    assert_invariants,
    assert_one_line_error,
    charge,
    cli,
    consume_all,
    fetchval,
    grant,
    outbox_empty,
    produce,
    record,
    running_worker,
    settings_env,
    setup_pipeline,
    wait_for,
)
from workers.settings import Settings


def ok_json(settings: Settings, *args: str) -> Any:
    done = cli(settings, *args, "--format", "json")
    assert done.returncode == 0, done.stderr
    return orjson.loads(done.stdout)


async def _count(settings: Settings, query: str, at_least: int) -> bool:
    return bool(await fetchval(settings, query) >= at_least)


async def _dead_lettered(settings: Settings, flow_events: int, bad: int) -> None:
    """Produce charges for the paused flow_p and ``bad`` broken records; wait until recorded."""
    events = [record(charge("flow_p", f"c{n % 5}", f"p{n}", 100 + n)) for n in range(flow_events)]
    events += [record(b"{broken", "c1") for _ in range(bad)]
    await produce(settings, settings.topic_charges, events)
    await wait_for(
        functools.partial(_count, settings, "SELECT count(*) FROM dead_letters", flow_events + bad),
        what="dead letters",
    )


async def test_paused_flow_dead_letters_become_charges_once(settings: Settings) -> None:
    await setup_pipeline(settings, partitions=2, flows=[("flow_p", "paused")])
    async with running_worker(settings):
        await _dead_lettered(settings, 5, bad=1)

        listed = ok_json(settings, "dlq", "list", "--reason", "flow_paused")
        assert len(listed) == 5
        assert {row["replayed_at"] for row in listed} == {None}
        assert set(listed[0]) >= {"id", "reason", "topic", "partition", "offset", "detail"}

        # Still paused: nothing is sent, the dead letters stay for later.
        early = ok_json(settings, "dlq", "replay")
        assert early["replayed"] == 0
        assert [s["why"] for s in early["skipped"]] == ["flow 'flow_p' is paused"] * 5

        assert cli(settings, "flows", "resume", "flow_p").returncode == 0
        preview = ok_json(settings, "dlq", "replay", "--dry-run")
        assert (preview["dry_run"], preview["replayed"]) == (True, 5)
        assert ok_json(settings, "dlq", "list", "--replayed", "yes") == []

        first = ok_json(settings, "dlq", "replay")
        assert first["replayed"] == 5
        assert first["by_reason"] == {"flow_paused": 5}
        assert sorted(first["ids"]) == sorted(row["id"] for row in listed)
        await wait_for(
            functools.partial(_count, settings, "SELECT count(*) FROM charges", 5),
            what="5 charges",
        )

        second = ok_json(settings, "dlq", "replay")
        assert (second["replayed"], second["skipped"]) == (0, [])
        assert ok_json(settings, "dlq", "replay", "--reason", "flow_paused")["replayed"] == 0
        assert ok_json(settings, "dlq", "replay", "--ids", str(listed[0]["id"]))["replayed"] == 0
        await asyncio.sleep(1)
        await wait_for(functools.partial(outbox_empty, settings), what="outbox drained")

    assert await fetchval(settings, "SELECT count(*) FROM charges") == 5
    assert await fetchval(settings, "SELECT sum(amount) FROM charges") == sum(
        100 + n for n in range(5)
    )
    replayed = ok_json(settings, "dlq", "list", "--replayed", "yes")
    assert sorted(row["id"] for row in replayed) == sorted(row["id"] for row in listed)
    assert all(row["replayed_at"] is not None for row in replayed)
    # The broken record is not retryable: never replayed by default, still listed.
    assert [row["reason"] for row in ok_json(settings, "dlq", "list", "--replayed", "no")] == [
        "invalid_json"
    ]
    # The copies on the input topic carry their dead letter's id.
    on_topic = await consume_all(settings, settings.topic_charges, expected=11)
    replayed_from = sorted(
        int(value)
        for message in on_topic
        for name, value in (message.headers or ())
        if name == "chargeline.replayed-from"
    )
    assert replayed_from == sorted(row["id"] for row in listed)
    await assert_invariants(settings)


async def test_two_replays_at_once_publish_each_dead_letter_once(settings: Settings) -> None:
    await setup_pipeline(settings, partitions=3, flows=[("flow_p", "paused")])
    async with running_worker(settings, "charges"):
        await _dead_lettered(settings, 1200, bad=0)
    assert cli(settings, "flows", "resume", "flow_p").returncode == 0

    env = {**os.environ, **settings_env(settings)}
    command = [sys.executable, "-m", "workers.cli.main", "dlq", "replay", "--format", "json"]
    runs = [
        await asyncio.create_subprocess_exec(
            *command, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        for _ in range(2)
    ]
    outputs = [await run.communicate() for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    reports = [orjson.loads(out) for out, _ in outputs]
    ids = [set(report["ids"]) for report in reports]
    assert not ids[0] & ids[1]
    assert sum(report["replayed"] for report in reports) == 1200

    async with running_worker(settings, "charges"):
        await wait_for(
            functools.partial(_count, settings, "SELECT count(*) FROM charges", 1200),
            what="1200 charges",
        )
        await asyncio.sleep(1)
    assert await fetchval(settings, "SELECT count(*) FROM charges") == 1200
    assert await fetchval(settings, "SELECT count(*) FROM dead_letters") == 1200
    assert (
        await fetchval(settings, "SELECT count(*) FROM dead_letters WHERE replayed_at IS NULL") == 0
    )
    await assert_invariants(settings)


async def test_replay_by_id_and_bad_ids(settings: Settings) -> None:
    await setup_pipeline(settings, partitions=1, flows=[("flow_p", "paused")])
    async with running_worker(settings, "charges"):
        await _dead_lettered(settings, 3, bad=1)
        assert cli(settings, "flows", "resume", "flow_p").returncode == 0
        rows = ok_json(settings, "dlq", "list")
        broken = next(row["id"] for row in rows if row["reason"] == "invalid_json")
        paused = sorted(row["id"] for row in rows if row["reason"] == "flow_paused")
        # An explicit id is replayed whatever its reason (here: it comes back dead-lettered).
        by_id = ok_json(settings, "dlq", "replay", "--ids", f"{paused[0]},{broken}")
        assert sorted(by_id["ids"]) == sorted([paused[0], broken])
        await wait_for(
            functools.partial(_count, settings, "SELECT count(*) FROM dead_letters", 5),
            what="the broken record dead-lettered again",
        )
        await wait_for(
            functools.partial(_count, settings, "SELECT count(*) FROM charges", 1),
            what="1 charge",
        )
    missing = cli(settings, "dlq", "replay", "--ids", f"{paused[1]},999999")
    assert missing.returncode == 1
    assert "no dead letter with id 999999" in missing.stderr
    assert_one_line_error(
        cli(settings, "dlq", "replay", "--ids", "1,x"), code=2, mentions="expected ids"
    )
    assert_one_line_error(
        cli(settings, "dlq", "replay", "--ids", "1", "--reason", "flow_paused"),
        code=2,
        mentions="not allowed with",
    )
    await assert_invariants(settings)


async def test_a_void_is_replayed_once_its_grant_exists_and_not_before(settings: Settings) -> None:
    """A void that came before its grant is dead-lettered unknown_grant. Replayed while the
    grant is still missing it would only be dead-lettered again, as a new letter the next
    run replays in turn: it is skipped until the grant exists, then applied once."""
    await setup_pipeline(settings, partitions=1)
    void = {"type": "credit_void", "customer_ref": "c1", "reference": "v1",
            "grant_reference": "g1", "reason": "refund"}  # fmt: skip
    async with running_worker(settings, "usage"):
        await produce(settings, settings.topic_usage, [record(void)])
        await wait_for(
            functools.partial(_count, settings, "SELECT count(*) FROM dead_letters", 1),
            what="the void dead-lettered",
        )
        for _ in range(2):
            early = ok_json(settings, "dlq", "replay")
            assert early["replayed"] == 0
            assert [s["why"] for s in early["skipped"]] == [
                "customer 'c1' has no grant 'g1' a void can apply to"
            ]
        assert await fetchval(settings, "SELECT count(*) FROM dead_letters") == 1
        await produce(settings, settings.topic_usage, [record(grant("c1", "g1", 100))])
        await wait_for(
            functools.partial(_count, settings, "SELECT count(*) FROM grants", 1), what="grant"
        )
        assert ok_json(settings, "dlq", "replay")["replayed"] == 1
        await wait_for(
            functools.partial(
                _count, settings, "SELECT count(*) FROM grants WHERE status = 'voided'", 1
            ),
            what="the grant voided",
        )
    assert await fetchval(settings, "SELECT balance FROM customers WHERE customer_ref = 'c1'") == 0
    assert await fetchval(settings, "SELECT count(*) FROM dead_letters") == 1
    await assert_invariants(settings)
