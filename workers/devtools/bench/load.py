"""The bench's load: the mixed records it drains, and the ones it sends at a fixed rate.

Both loads are built before any clock starts, so that building them is never part of what
a phase measures. The drained load is published all at once (``publish``); the fixed-rate
load is planned, partitioned as the producer would, and then only sent (``send_at_rate``),
so that the generator takes as little as it can of the CPU it shares with the worker and
the servers.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from workers.kafka import make_producer
from workers.settings import Settings

CUSTOMERS = 10_000
FLOWS = 20
PARTITIONS = 6
DEPLETING_EVERY = 25  # one record in 25 of the fixed-rate load belongs to a depletion
# How often the fixed-rate load sends what is due, one batch a partition: a producer's
# linger. Each record is stamped with the moment it fell due, so the wait counts against
# the latency measured. Not finer: on the embedded broker every produce request wakes each
# consumer's waiting fetch (README, "The curve").
SEND_TICK_S = 0.02


@dataclass
class Load:
    """The records of the mixed load, in publication order, and what they contain."""

    usage: list[tuple[bytes, bytes]] = field(default_factory=list)
    charges: list[tuple[bytes, bytes]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.usage) + len(self.charges)


def customer_count(events: int) -> int:
    return min(CUSTOMERS, max(10, events // 100))


def build_load(events: int, *, seed: int = 1, run: str = "") -> Load:
    """``events`` records; grants for every customer first, so usage has something to eat."""
    rng = random.Random(seed)  # noqa: S311 -- benchmark data, not secrets
    load = Load()
    customers = customer_count(events)
    unique_usage: list[tuple[bytes, bytes]] = []
    unique_charges: list[tuple[bytes, bytes]] = []
    for n in range(customers):
        customer = f"cust-{n:05d}"
        # Most grants are large; one customer in twenty runs dry, so alerts fire too.
        tokens = 2_000 if n % 20 == 0 else 10_000_000
        unique_usage.append(_grant(customer, f"{run}grant-{n}", tokens))
    malformed = max(1, events // 1000)
    duplicates = events * 5 // 100
    fresh = events - customers - duplicates - malformed
    usage_share = fresh * 80 // 100 + customers  # grants count as usage-topic events
    for n in range(usage_share - customers):
        customer = f"cust-{rng.randrange(customers):05d}"
        unique_usage.append(_usage(customer, f"{run}req-{n}", rng.randint(1, 400), n))
    for n in range(fresh - (usage_share - customers)):
        customer = f"cust-{rng.randrange(customers):05d}"
        unique_charges.append(_charge(f"flow-{n % FLOWS:02d}", customer, f"{run}job-{n}", rng))
    load.usage = list(unique_usage)
    load.charges = list(unique_charges)
    # Sliced once, outside the loop: a slice per pick would copy the list for every duplicate.
    usage_only = unique_usage[customers:] or unique_usage
    for _ in range(duplicates):
        if rng.random() < 0.8:
            load.usage.append(rng.choice(usage_only))
        else:
            load.charges.append(rng.choice(unique_charges or unique_usage))
    for n in range(malformed):
        load.usage.append(
            (b"cust-00001", b'{"type": "usage", "tokens": 1.5, "ref' + str(n).encode())
        )
    # Duplicates and poison spread through the load, not all at its end.
    tail_u, tail_c = load.usage[customers:], load.charges
    rng.shuffle(tail_u)
    rng.shuffle(tail_c)
    load.usage = load.usage[:customers] + tail_u
    return load


def _grant(customer: str, reference: str, tokens: int) -> tuple[bytes, bytes]:
    event = {
        "type": "credit_grant", "customer_ref": customer, "reference": reference,
        "tokens": tokens, "cost_basis": "0.0001", "currency": "USD", "source": "purchase",
    }  # fmt: skip
    return customer.encode(), orjson.dumps(event)


def _usage(customer: str, reference: str, tokens: int, n: int) -> tuple[bytes, bytes]:
    event = {
        "type": "usage", "customer_ref": customer, "reference": reference, "tokens": tokens,
        "feature": ("chat", "images", "embeddings")[n % 3],
    }  # fmt: skip
    return customer.encode(), orjson.dumps(event)


def charge_event(flow: str, customer: str, reference: str, rng: random.Random) -> dict[str, Any]:
    """A charge of the load's kind, as the event object the charges topic carries."""
    return {
        "type": "charge", "flow_id": flow, "customer_ref": customer, "reference": reference,
        "amount": rng.randint(1, 50_000), "currency": rng.choice(("EUR", "USD", "JPY")),
        "metadata": {"job": reference},
    }  # fmt: skip


def _charge(flow: str, customer: str, reference: str, rng: random.Random) -> tuple[bytes, bytes]:
    return customer.encode(), orjson.dumps(charge_event(flow, customer, reference, rng))


def charge_events(count: int, customers: int, reference: str, *, seed: int) -> list[dict[str, Any]]:
    """``count`` charges like the load's (over its flows, by its customers), their references
    ``reference`` followed by a number: the HTTP phase's events, built before its clocks."""
    rng = random.Random(seed)  # noqa: S311 -- benchmark data, not secrets
    return [
        charge_event(
            f"flow-{n % FLOWS:02d}", f"cust-{rng.randrange(customers):05d}", f"{reference}{n}", rng
        )
        for n in range(count)
    ]


async def publish(settings: Settings, load: Load) -> float:
    """Seconds to publish ``load``, usage first, then charges."""
    producer = make_producer(settings, client_id="chargeline-bench")
    await producer.start()
    started = time.monotonic()
    try:
        for topic, records in (
            (settings.topic_usage, load.usage),
            (settings.topic_charges, load.charges),
        ):
            pending: list[asyncio.Future[Any]] = []
            for key, value in records:
                pending.append(await producer.send(topic, value=value, key=key))
                if len(pending) >= 20_000:
                    await asyncio.gather(*pending)
                    pending.clear()
            await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.monotonic() - started


def fixed_rate_record(
    n: int, customers: int, run: str, rng: random.Random
) -> tuple[str, tuple[bytes, bytes], str | None]:
    """Record ``n`` of the fixed-rate load: (topic kind, (key, value), depleting reference).

    The mix of the drained load (usage of customers with grants, charges over the flows),
    so that half of the drain's throughput is half capacity for it too; one record in
    ``DEPLETING_EVERY`` is a step of a depletion: a fresh customer gets 1,000 tokens and
    its third usage of 400 drains them, which must raise an alert.
    """
    if n % DEPLETING_EVERY == 0:
        step = n // DEPLETING_EVERY
        customer = f"{run}lat-{step // 4:06d}"
        if step % 4 == 0:
            return "usage", _grant(customer, f"{run}lat-grant-{step}", 1_000), None
        reference = f"{run}lat-{step}"
        return "usage", _usage(customer, reference, 400, n), reference if step % 4 == 3 else None
    customer = f"cust-{rng.randrange(customers):05d}"
    if rng.random() < 0.8:
        return "usage", _usage(customer, f"{run}lat-req-{n}", rng.randint(1, 400), n), None
    return "charges", _charge(f"flow-{n % FLOWS:02d}", customer, f"{run}lat-job-{n}", rng), None


class Planned(NamedTuple):
    topic: str
    key: bytes
    value: bytes
    partition: int  # the one the producer's partitioner picks for the key
    depleting: str | None  # the reference of a depleting usage, whose alert is timed


def plan_fixed_rate(
    records: int, customers: int, run: str, topics: dict[str, str]
) -> list[Planned]:
    """The fixed-rate load, built before its clock starts: while it runs the generator only
    sends, taking as little as it can of the CPU it shares with the worker and the servers.
    Building a record and partitioning it (aiokafka's murmur2 is pure Python) would
    otherwise be part of the cost of every send."""
    rng = random.Random(7)  # noqa: S311 -- benchmark data, not secrets
    partitioner, partitions = DefaultPartitioner(), list(range(PARTITIONS))
    planned: list[Planned] = []
    for n in range(records):
        kind, (key, value), depleting = fixed_rate_record(n, customers, run, rng)
        partition = partitioner(key, partitions, partitions)
        planned.append(Planned(topics[kind], key, value, partition, depleting))
    return planned


async def send_at_rate(
    producer: AIOKafkaProducer,
    planned: list[Planned],
    rate: float,
    seconds: float,
    *,
    tick_s: float = SEND_TICK_S,
    stamp_due: bool = True,
) -> tuple[int, float, dict[str, int], list[asyncio.Future[Any]]]:
    """Send ``planned`` at ``rate`` records/s for ``seconds``.

    Every tick (``tick_s``), the records due are appended to one batch per partition and
    each batch is sent as it is. aiokafka's ``send`` runs Python for every record, on the
    cores the worker and the servers need; its batch builder does that work in C. The last
    tick falls at ``seconds``, so that what is due by then is sent whatever the tick.
    A record's CreateTime, from which the worker measures latency, is the time it fell due
    with ``stamp_due``: the tick's wait counts as latency, as a producer's linger does for
    an event created meanwhile; else the time it is sent.
    Returns the records sent, the seconds it took, the timestamp (ms) of each depleting
    record by reference, and the acks to wait for.
    """
    acks: list[asyncio.Future[Any]] = []
    sent: dict[str, int] = {}
    count = 0
    started, started_ms = time.monotonic(), time.time() * 1000
    while True:
        elapsed = min(time.monotonic() - started, seconds)
        due = min(len(planned), int(elapsed * rate))
        now_ms = int(time.time() * 1000)
        batches: dict[tuple[str, int], Any] = {}  # aiokafka's BatchBuilder, untyped
        while count < due:
            topic, key, value, partition, depleting = planned[count]
            if stamp_due:
                now_ms = int(started_ms + count * 1000 / rate)
            batch = batches.get((topic, partition))
            if batch is None or batch.append(key=key, value=value, timestamp=now_ms) is None:
                if batch is not None:  # full: send it, go on in a new one
                    acks.append(await producer.send_batch(batch, topic, partition=partition))
                batch = batches[(topic, partition)] = producer.create_batch()
                batch.append(key=key, value=value, timestamp=now_ms)
            if depleting is not None:
                sent[depleting] = now_ms
            count += 1
        for (topic, partition), batch in batches.items():
            acks.append(await producer.send_batch(batch, topic, partition=partition))
        if elapsed >= seconds:
            break
        await asyncio.sleep(min(tick_s, seconds - elapsed))
    return count, time.monotonic() - started, sent, acks
