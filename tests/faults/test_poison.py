"""Poison records interleaved with valid events: invalid JSON, invalid UTF-8, schema
violations, huge values, a 2 MiB record, wrong and missing keys, instants out of range. Each is
dead-lettered exactly once with its reason (in Postgres and on billing.dlq), the valid
events around it are applied, and the worker never crashes or restarts."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import orjson
from aiokafka.errors import KafkaError

from tests.faults.expected import Load, Sent, check, expected, wait_applied
from tests.faults.harness import Position, Producer, fault_settings, topic_records, workers
from tests.support import fetch, setup_pipeline
from workers.settings import Settings

TWO_MIB = 2 << 20
FLOWS = {"flow_a": "active"}


def charge_bytes(**fields: object) -> bytes:
    event = {"type": "charge", "flow_id": "flow_a", "customer_ref": "c1", "reference": "p",
             "amount": 100, "currency": "EUR"}  # fmt: skip
    event.update(fields)
    return orjson.dumps({k: v for k, v in event.items() if v is not None})


def poison_records() -> list[tuple[str, bytes | None, bytes | None, str, str]]:
    """(topic, key, value, expected reason, what it is)."""
    good = charge_bytes()
    deep = b'{"a":' * 5000 + b"1" + b"}" * 5000
    return [
        ("charges", b"c1", b'{"type": "charge", "amount": ', "invalid_json", "truncated JSON"),
        ("charges", b"c1", b"\xff\xfe\x00garbage", "invalid_json", "binary garbage"),
        ("charges", b"c1", good.replace(b'"c1"', b'"c1\xff"'), "invalid_json",
         "invalid UTF-8 inside a string"),
        ("usage", b"c1", b'{"type":"usage","customer_ref":"c1","reference":"\xc3\x28","tokens":1}',
         "invalid_json", "invalid UTF-8 sequence"),
        ("charges", b"c1", b"", "invalid_json", "empty value"),
        ("charges", b"c1", None, "invalid_json", "tombstone (no value)"),
        ("charges", b"c1", b"[1, 2, 3]", "invalid_event", "a JSON array"),
        ("charges", b"c1", charge_bytes(amount=None, ammount=100), "invalid_event",
         "unknown field ammount"),
        ("charges", b"c1", charge_bytes(amount="100"), "invalid_event", "amount as a string"),
        ("charges", b"c1", good.replace(b'"amount":100', b'"amount":100.0'), "invalid_event",
         "amount as a float"),
        ("charges", b"c1", charge_bytes(amount=True), "invalid_event", "amount as a boolean"),
        ("charges", b"c1", charge_bytes(type="refund"), "invalid_event", "unknown type"),
        ("charges", b"c1", charge_bytes(currency="XYZ"), "invalid_event", "unknown currency"),
        ("charges", b"c1", charge_bytes(occurred_at="2099-01-01T00:00:00Z"), "invalid_event",
         "occurred_at far in the future"),
        ("charges", b"c1", charge_bytes(amount=10**13), "invalid_event", "amount over 10^12"),
        ("charges", b"c1", good.replace(b'"amount":100', b'"amount":' + b"9" * 400),
         "invalid_event", "a 400-digit amount"),
        ("usage", b"c1", b'{"type":"usage","customer_ref":"c1","reference":"u","tokens":%d}'
         % 2**64, "invalid_event", "tokens 2^64"),
        ("charges", b"c1", charge_bytes(reference="r" * 5000), "invalid_event",
         "a 5000-character reference"),
        ("charges", b"c1", charge_bytes(metadata={"blob": "x" * 20_000}), "invalid_event",
         "20 KB of metadata"),
        ("charges", b"c1", good.replace(b"}", b',"metadata":' + deep + b"}"), "invalid_json",
         "metadata nested 5000 deep"),
        ("charges", b"c1", charge_bytes(metadata={"blob": "x" * 70_000}), "payload_too_large",
         "a 70 KB record"),
        ("charges", b"c1", charge_bytes(metadata={"blob": "x" * TWO_MIB}), "payload_too_large",
         "a 2 MiB record"),
        ("charges", b"someone-else", good, "key_mismatch", "key of another customer"),
        ("charges", None, good, "key_mismatch", "no key"),
        ("usage", b"c1", charge_bytes(), "wrong_topic", "a charge on the usage topic"),
        ("charges", b"c1", charge_bytes(flow_id="no_such_flow"), "unknown_flow",
         "a charge of an unknown flow"),
        ("charges", b"c1", charge_bytes(occurred_at="0001-01-01T00:00:00+01:00"),
         "invalid_event", "an occurred_at in year 0 once in UTC"),
        ("usage", b"c1", b'{"type":"credit_grant","customer_ref":"c1","reference":"g",'
         b'"tokens":5,"cost_basis":"0","currency":"USD","source":"plan",'
         b'"expires_at":"9999-12-31T23:59:59-01:00"}', "invalid_event",
         "an expires_at in year 10000 once in UTC"),
        ("usage", b"c1", b'{"type":"credit_void","customer_ref":"c1","reference":"v",'
         b'"grant_reference":"never-granted","reason":"refund"}', "unknown_grant",
         "a void of a grant that does not exist"),
    ]  # fmt: skip


async def test_poison_records_are_dead_lettered_once_and_neighbours_applied(
    settings: Settings, tmp_path: Path
) -> None:
    rng = random.Random(6)
    settings = fault_settings(settings, batch_max_records=40)
    await setup_pipeline(settings, partitions=3, flows=list(FLOWS.items()))
    poison = poison_records()
    load = Load()
    items: list[Sent] = []
    # Each poison record, twice over the run, between valid events of the same customer
    # (same key, same partition): a batch holds poison and valid events side by side.
    for round_ in range(2):
        for n, (topic, key, value, reason, _what) in enumerate(poison):
            ref = f"{round_}-{n}"
            for k in range(4):
                items.append(load.charge("flow_a", "c1", f"c-{ref}-{k}", rng.randint(1, 500)))
                items.append(load.grant("c1", f"g-{ref}-{k}", 50))
                items.append(load.usage("c1", f"u-{ref}-{k}", rng.randint(1, 120)))
                other = f"c{rng.randint(2, 30)}"
                items.append(load.charge("flow_a", other, f"o-{ref}-{k}", rng.randint(1, 500)))
                items.append(load.usage(other, f"uo-{ref}-{k}", rng.randint(1, 20)))
            items.append(load.poison(topic, key, value, reason))
    want_reason: dict[Position, str] = {}
    refused: list[str] = []
    with workers(settings, tmp_path) as group:
        worker = group.spawn("charges", "usage", "outbox")
        async with Producer(settings, max_request_size=4 << 20) as producer:
            chunk: list[Sent] = []
            for item in [*items, None]:
                if item is not None and (item.value is None or len(item.value) < TWO_MIB):
                    chunk.append(item)
                    continue
                positions = await producer.publish(settings, chunk)
                want_reason.update(
                    (pos, sent.reason)
                    for pos, sent in zip(positions, chunk, strict=True)
                    if sent.reason
                )
                chunk = []
                if item is None:
                    break
                try:  # the 2 MiB record on its own: a broker may refuse it
                    [pos] = await producer.publish(settings, [item])
                    assert item.reason is not None
                    want_reason[pos] = item.reason
                except KafkaError as exc:
                    refused.append(f"{type(exc).__name__}")
                    load.sent.remove(item)
        want = expected(load, flows=FLOWS)
        waited = await wait_applied(settings, want, timeout=90)
        assert worker.alive, "the worker died on a poison record"
        starts = len(worker.log("worker_started"))
        assert starts == 1, f"worker started {starts} times"
        summary = await check(settings, want)

        # Every poison record dead-lettered at its own position with its own reason.
        rows = await fetch(
            settings,
            'SELECT topic, partition, "offset", reason, detail, length(record_value) AS size '
            "FROM dead_letters",
        )
        got_reason = {(r["topic"], r["partition"], r["offset"]): r["reason"] for r in rows}
        assert got_reason == want_reason
        assert all(r["detail"] for r in rows), "a dead letter without a detail"
        sizes = sorted(r["size"] or 0 for r in rows)
        # ... and each one on billing.dlq, once, with its reason and source position.
        dlq = await topic_records(settings, settings.topic_dlq, expected=len(rows), timeout=30)
        on_dlq: Counter[Position] = Counter()
        for message in dlq:
            headers = {name: value.decode() for name, value in message.headers}
            position = (
                headers["chargeline.source.topic"],
                int(headers["chargeline.source.partition"]),
                int(headers["chargeline.source.offset"]),
            )
            on_dlq[position] += 1
            assert headers["chargeline.reason"] == want_reason[position]
            if len(message.value or b"") >= 64 * 1024:
                assert int(headers["chargeline.truncated"]) > 64 * 1024
        assert set(on_dlq) == set(want_reason)
    print(
        f"injected {len(want_reason)} poison records ({len(poison)} kinds x 2, the largest "
        f"{sizes[-1]} bytes; refused by the broker: {refused or 'none'}) among "
        f"{len(load.valid)} valid events; applied in {waited:.1f}s by one worker that never "
        f"restarted; checked {summary}; {len(dlq)} records on billing.dlq "
        f"({sum(on_dlq.values()) - len(on_dlq)} duplicates)"
    )
