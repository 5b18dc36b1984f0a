"""Charge events from Kafka into Postgres with dedup and dead letters."""

from __future__ import annotations

import asyncio
import functools
import random
from typing import Any

import orjson
import pytest

from tests.support import (
    assert_invariants,
    charge,
    consume_all,
    fetch,
    fetchval,
    ingest_done,
    produce,
    record,
    running_worker,
    setup_pipeline,
    wait_for,
)
from workers.kafka import make_producer
from workers.settings import Settings


def _sample(metrics: Any, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_thousand_events_with_duplicates_conflicts_and_bad_input(settings: Settings) -> None:
    rng = random.Random(2)
    await setup_pipeline(
        settings, flows=[("flow_a", "active"), ("flow_b", "active"), ("flow_old", "paused")]
    )
    unique = [
        charge(
            rng.choice(["flow_a", "flow_b"]),
            f"cust_{rng.randint(1, 50)}",
            f"ref-{n}",
            rng.randint(1, 10_000),
        )
        for n in range(890)
    ]
    duplicates = rng.sample(unique, 100)  # 10% exact duplicates
    conflicts = [dict(event, amount=event["amount"] + 1) for event in unique[:3]]
    malformed: list[tuple[bytes | None, bytes]] = [
        record(b"{not json", key="cust_1"),
        record(b"\xff\xfe\x00garbage", key="cust_1"),
        record({**charge("flow_a", "cust_1", "bad-float"), "amount": 100.0}),
        record({**charge("flow_a", "cust_1", "bad-field"), "ammount": 5}),
        record(charge("flow_a", "cust_1", "bad-currency", currency="ZZZ")),
    ]
    paused = [charge("flow_old", "cust_2", f"paused-{n}") for n in range(2)]
    # Originals first, then the rest shuffled: every conflict comes after the payload it
    # collides with, so "the first stored payload wins" is what is checked.
    rest = [record(e) for e in duplicates + conflicts + paused] + malformed
    rng.shuffle(rest)
    records = [record(e) for e in unique] + rest
    assert len(records) == 1000

    async with running_worker(settings) as process:
        await produce(settings, settings.topic_charges, records)
        await wait_for(functools.partial(ingest_done, process, 1000), what="1000 records processed")
        await wait_for(lambda: _published(settings), what="dead letters published to billing.dlq")
        metrics = process.metrics

    assert await fetchval(settings, "SELECT count(*) FROM charges") == 890
    stored = {
        (r["flow_id"], r["reference"]): r["amount"]
        for r in await fetch(settings, "SELECT flow_id, reference, amount FROM charges")
    }
    for event in unique[:3]:  # the first payload won; the conflicting one never overwrote it
        assert stored[(event["flow_id"], event["reference"])] == event["amount"]
    reasons = {
        r["reason"]: r["n"]
        for r in await fetch(settings, "SELECT reason, count(*) AS n FROM dead_letters GROUP BY 1")
    }
    assert reasons == {
        "reference_conflict": 3,
        "flow_paused": 2,
        "invalid_json": 2,
        "invalid_event": 3,
    }
    conflict_rows = await fetch(
        settings, "SELECT original_payload, conflicting_payload FROM conflicts"
    )
    assert len(conflict_rows) == 3
    for row in conflict_rows:
        original, conflicting = (
            orjson.loads(row["original_payload"]),
            orjson.loads(row["conflicting_payload"]),
        )
        assert conflicting["amount"] == original["amount"] + 1

    topic = settings.topic_charges
    assert (
        _sample(metrics, "chargeline_events_total", topic=topic, type="charge", outcome="recorded")
        == 890
    )
    assert (
        _sample(metrics, "chargeline_events_total", topic=topic, type="charge", outcome="duplicate")
        == 100
    )
    assert (
        _sample(metrics, "chargeline_events_total", topic=topic, type="charge", outcome="conflict")
        == 3
    )
    assert (
        _sample(metrics, "chargeline_events_total", topic=topic, type="charge", outcome="rejected")
        == 2
    )
    assert (
        _sample(metrics, "chargeline_events_total", topic=topic, type="unknown", outcome="invalid")
        == 5
    )
    for reason, n in reasons.items():
        assert _sample(metrics, "chargeline_dead_letters_total", reason=reason) == n

    dlq = await consume_all(settings, settings.topic_dlq, expected=10)
    assert len(dlq) == 10
    by_reason: dict[str, int] = {}
    for message in dlq:
        headers = dict(message.headers)
        reason = headers["chargeline.reason"].decode()
        by_reason[reason] = by_reason.get(reason, 0) + 1
        assert headers["chargeline.source.topic"].decode() == topic
        assert int(headers["chargeline.source.offset"]) >= 0
    assert by_reason == reasons
    await assert_invariants(settings)


async def _published(settings: Settings) -> bool:
    return bool(
        await fetchval(settings, "SELECT count(*) = 0 FROM outbox WHERE published_at IS NULL")
    )


async def test_unknown_flow_and_wrong_key_are_dead_lettered_and_neighbours_applied(
    settings: Settings,
) -> None:
    await setup_pipeline(settings, partitions=1, flows=[("flow_a", "active")])
    records = [
        record(charge("flow_a", "c1", "r1")),
        record(charge("flow_nope", "c1", "r2")),
        record(charge("flow_a", "c1", "r3"), key="someone-else"),
        record(charge("flow_a", "c1", "r4")),
    ]
    async with running_worker(settings) as process:
        await produce(settings, settings.topic_charges, records)
        await wait_for(functools.partial(ingest_done, process, 4), what="4 records")
    rows = await fetch(
        settings, 'SELECT reason, "offset", detail FROM dead_letters ORDER BY "offset"'
    )
    assert [(r["reason"], r["offset"]) for r in rows] == [("unknown_flow", 1), ("key_mismatch", 2)]
    assert "flow_nope" in rows[0]["detail"]
    refs = [
        r["reference"]
        for r in await fetch(settings, "SELECT reference FROM charges ORDER BY source_offset")
    ]
    assert refs == ["r1", "r4"]


@pytest.mark.parametrize(("linger_ms", "batches"), [(0, 3), (5000, 1)])
async def test_records_arriving_within_the_linger_are_applied_as_one_batch(
    settings: Settings, linger_ms: int, batches: int
) -> None:
    await setup_pipeline(settings, partitions=1, flows=[("flow_a", "active")])
    settings = settings.model_copy(update={"batch_linger_ms": linger_ms})
    assert await _batches_for_three_charges(settings) == batches
    assert await fetchval(settings, "SELECT count(*) FROM charges") == 3


async def test_a_batch_stops_gathering_at_its_byte_budget(settings: Settings) -> None:
    """Large records make smaller batches: the second of three 700 KiB records takes the
    batch past its 1 MiB, so it is applied without waiting out the linger for the third."""
    await setup_pipeline(settings, partitions=1, flows=[("flow_a", "active")])
    settings = settings.model_copy(
        update={"batch_linger_ms": 5000, "batch_max_bytes": 1 << 20, "max_event_bytes": 1 << 20}
    )
    assert await _batches_for_three_charges(settings, padding=700 << 10) == 2
    assert await fetchval(settings, "SELECT count(*) FROM charges") == 3


async def _batches_for_three_charges(settings: Settings, *, padding: int = 0) -> int:
    """Send three charges 0.3 s apart (three fetches apart) to a charges worker, each
    padded with ``padding`` spaces (still the same charge); how many batches applied them."""
    producer = make_producer(settings, client_id="test-producer", linger_ms=0)
    await producer.start()
    try:
        async with running_worker(settings, "charges") as process:
            await wait_for(functools.partial(_assigned, process), what="the partition assigned")
            for n in range(3):
                key, value = record(charge("flow_a", "cust_1", f"ref-{n}"))
                value = value[:-1] + b" " * padding + b"}"
                await (await producer.send(settings.topic_charges, value=value, key=key))
                await asyncio.sleep(0.3)
            await wait_for(functools.partial(ingest_done, process, 3), what="3 records processed")
            metrics = process.metrics
    finally:
        await producer.stop()
    return int(
        sum(
            sample.value
            for family in metrics.registry.collect()
            if family.name == "chargeline_batch_size"
            for sample in family.samples
            if sample.name == "chargeline_batch_size_count"
        )
    )


async def _assigned(process: Any) -> bool:
    return process.ingest is not None and bool(process.ingest.consumer.assignment())


async def test_a_rebalance_while_a_batch_gathers_goes_on(settings: Settings) -> None:
    # aiokafka marks a rebalance begun before it calls the revoke listener, which waits for
    # the batch being gathered; a fetch begun after that mark waits for the new assignment.
    # Unbounded, the two would wait for each other and the new member would never join.
    await setup_pipeline(settings, partitions=2, flows=[("flow_a", "active")])
    settings = settings.model_copy(update={"batch_linger_ms": 2000})
    producer = make_producer(settings, client_id="test-producer", linger_ms=0)
    await producer.start()
    sent = 0
    stop = asyncio.Event()

    async def trickle() -> None:  # records closer together than the linger: always gathering
        nonlocal sent
        while not stop.is_set():
            key, value = record(charge("flow_a", f"cust_{sent % 7}", f"ref-{sent}"))
            await (await producer.send(settings.topic_charges, value=value, key=key))
            sent += 1
            await asyncio.sleep(0.05)

    try:
        async with running_worker(settings, "charges") as first:
            await wait_for(functools.partial(_assigned, first), what="the first member assigned")
            sending = asyncio.create_task(trickle())
            await asyncio.sleep(0.5)
            async with running_worker(settings, "charges") as second:
                await wait_for(
                    functools.partial(_assigned, second),
                    timeout=30,
                    what="the second member assigned, the first having let its partition go",
                )
                stop.set()
                await sending
                await wait_for(
                    lambda: _charges_are(settings, sent), timeout=30, what="every charge applied"
                )
    finally:
        stop.set()
        await producer.stop()
    assert await fetchval(settings, "SELECT count(DISTINCT reference) FROM charges") == sent


async def _charges_are(settings: Settings, count: int) -> bool:
    return bool(await fetchval(settings, "SELECT count(*) = $1 FROM charges", count))
