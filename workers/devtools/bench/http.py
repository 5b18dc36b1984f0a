"""The HTTP path beside the direct producer: the same kind of charge events, published
straight to Kafka by the bench's producer (the baseline), then sent through a real
``chargeline api`` process, one charge a request and 500 a request; then the latency of
one charge at half the API's single-charge capacity: answered at once (202) with nothing
else running, then again while a charges worker applies them, and waiting for the worker's
verdict (``Prefer: wait=5``).

The API runs under uvicorn in a process of its own, as a deployment runs it, so that the
load generator (aiohttp, in the bench's process) and the server never share an event loop.
It uses the bench's database and broker, with topics and a consumer group of its own: what
the throughput phases publish is never applied (the worker's group starts after it), so
that the latency phases are not queued behind a backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from workers import db
from workers.api import keys
from workers.devtools.bench.load import PARTITIONS, charge_events
from workers.devtools.bench.worker import WorkerRun, free_port
from workers.kafka import client_options, ensure_topics, make_producer
from workers.settings import Settings

SINGLE_CONCURRENCY = 64  # requests in flight on one keep-alive session: enough to fill it
BATCH_EVENTS = 500
BATCH_CONCURRENCY = 4  # batches in flight: the server parses one while others wait on acks
WAIT_S = 5  # Prefer: wait=5
DIRECT_POOL = 10_000  # records the direct producer cycles through
SINGLE_POOL = 4_096  # bodies the single-charge clients cycle through
BATCH_POOL = 16  # batches the batch clients cycle through
REQUEST_TIMEOUT_S = 30.0
# Below uvicorn's keep-alive (5 s), so that the client never reuses a connection the
# server is closing.
KEEPALIVE_S = 2.0

# How often the fixed-rate requests are started: each is timed from its own scheduled
# moment, so a coarse tick would count the generator's lateness against the API.
REQUEST_TICK_S = 0.002


class ApiRun:
    """A real ``chargeline api`` process on a free loopback port, with ``settings``."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {
            **os.environ,
            **settings.model_copy(update={"api_host": "127.0.0.1", "api_port": self.port}).as_env(),
        }
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "workers.cli.main", "api"],
                env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    async def wait_ready(self, session: aiohttp.ClientSession, limit_s: float = 60) -> None:
        """Until /readyz answers 200: its Postgres pool and its producer are up."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the API exited with {self.process.returncode}: {self.tail()}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{self.base}/readyz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"the API was not ready in {limit_s}s: {self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


@dataclass
class Requests:
    """What the throughput phases send, built before their clocks start: records for the
    direct producer, (path, body) of single charges, and bodies of batches of 500."""

    records: list[tuple[bytes, bytes]]
    singles: list[tuple[str, bytes]]
    batches: list[bytes]


def single_request(event: dict[str, Any]) -> tuple[str, bytes]:
    """A charge event as the flow's route takes it: the flow in the path, no type."""
    body = {name: value for name, value in event.items() if name not in ("type", "flow_id")}
    return f"/v1/flows/{event['flow_id']}/charges", orjson.dumps(body)


def build_requests(customers: int, run: str) -> Requests:
    direct = charge_events(DIRECT_POOL, customers, f"{run}api-direct-", seed=11)
    singles = charge_events(SINGLE_POOL, customers, f"{run}api-single-", seed=12)
    batched = charge_events(BATCH_POOL * BATCH_EVENTS, customers, f"{run}api-batch-", seed=13)
    return Requests(
        records=[(event["customer_ref"].encode(), orjson.dumps(event)) for event in direct],
        singles=[single_request(event) for event in singles],
        batches=[
            orjson.dumps(batched[n : n + BATCH_EVENTS])
            for n in range(0, len(batched), BATCH_EVENTS)
        ],
    )


async def create_key(settings: Settings) -> str:
    """A key with the ingest scope, made as ``chargeline api-keys create`` makes one."""
    new = keys.new_key()
    conn = await db.connect(settings.dsn)
    try:
        await conn.execute(
            db.QUERIES["api_key_create"], "chargeline bench", new.prefix, new.lookup,
            new.digest, ["ingest"],
        )  # fmt: skip
    finally:
        await conn.close()
    return new.key


async def direct_publish(
    settings: Settings, records: list[tuple[bytes, bytes]], seconds: float
) -> float:
    """Events per second the bench's producer publishes to the charges topic for
    ``seconds``, acknowledged by the broker as the API's are (all in-sync replicas)."""
    producer = make_producer(settings, client_id="chargeline-bench-direct")
    await producer.start()
    try:
        pending: list[asyncio.Future[Any]] = []
        sent = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            for _ in range(1000):  # the clock read once per thousand
                key, value = records[sent % len(records)]
                pending.append(await producer.send(settings.topic_charges, value=value, key=key))
                sent += 1
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        return sent / (time.perf_counter() - started)
    finally:
        await producer.stop()


async def _post(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> int:
    """The answer's status; 0 for no answer (a connection error or a timeout)."""
    try:
        async with session.post(url, data=body, headers=headers) as response:
            await response.read()
            return response.status
    except (aiohttp.ClientError, TimeoutError):
        return 0


@dataclass
class Throughput:
    done: int  # requests answered as expected
    failed: int
    seconds: float


async def closed_loop(
    session: aiohttp.ClientSession,
    base: str,
    requests: list[tuple[str, bytes]],
    headers: dict[str, str],
    *,
    concurrency: int,
    seconds: float,
    expect: int,
) -> Throughput:
    """``concurrency`` clients on one session, each sending its next request as soon as the
    last is answered, for ``seconds``; the requests still in flight then are waited for and
    counted, and so is the time they take."""
    done = failed = 0
    picks = itertools.count()
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done, failed
        while time.perf_counter() < deadline:
            path, body = requests[next(picks) % len(requests)]
            if await _post(session, base + path, body, headers) == expect:
                done += 1
            else:
                failed += 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return Throughput(done, failed, time.perf_counter() - started)


async def at_rate(
    session: aiohttp.ClientSession,
    base: str,
    requests: list[tuple[str, bytes]],
    headers: dict[str, str],
    rate: float,
    expect: frozenset[int],
) -> tuple[list[float], int]:
    """Every request of ``requests`` started at its time on a fixed schedule of ``rate`` a
    second, however long earlier ones take. Returns the latencies (s) of the answers in
    ``expect``, each from the request's scheduled start, so that a sender running late
    counts against the figure rather than hiding it; and how many others came."""
    latencies: list[float] = []
    failed = 0

    async def one(path: str, body: bytes, scheduled: float) -> None:
        nonlocal failed
        if await _post(session, base + path, body, headers) in expect:
            latencies.append(time.perf_counter() - scheduled)
        else:
            failed += 1

    tasks: list[asyncio.Task[None]] = []
    # The load generator's own full collections (over every object the bench holds) would
    # stall the sender and count as the server's latency.
    gc.collect()
    gc.freeze()
    started = time.perf_counter()
    while len(tasks) < len(requests):
        due = min(len(requests), int((time.perf_counter() - started) * rate) + 1)
        for n in range(len(tasks), due):
            path, body = requests[n]
            tasks.append(asyncio.create_task(one(path, body, started + n / rate)))
        await asyncio.sleep(REQUEST_TICK_S)
    await asyncio.gather(*tasks)
    gc.unfreeze()
    return latencies, failed


def p99(values: list[float]) -> float:
    """The 99th percentile by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def skip_to_end(settings: Settings, group: str, topic: str) -> None:
    """Commit ``group``'s offsets at the end of ``topic``, so that a worker of that group
    starts after what is there: the throughput phases' records, never applied."""
    consumer = AIOKafkaConsumer(
        group_id=group, enable_auto_commit=False, **client_options(settings)
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.commit(await consumer.end_offsets(tps))
    finally:
        await consumer.stop()


async def _first_verdict(
    session: aiohttp.ClientSession, api: ApiRun, headers: dict[str, str], run: str, customers: int
) -> int:
    """Until one charge is answered with its verdict (201): the worker has joined its group
    and applies what the API publishes. Returns the charges sent meanwhile."""
    deadline = time.monotonic() + 90
    sent, status = 0, 202
    while status == 202 and time.monotonic() < deadline:
        sent += 1
        event = charge_events(1, customers, f"{run}api-first-{sent}-", seed=sent)[0]
        path, body = single_request(event)
        status = await _post(session, api.base + path, body, {**headers, "Prefer": "wait=10"})
        if status == 201:
            return sent
    raise RuntimeError(f"no verdict through the API (status {status}): {api.tail()}")


async def http_api(
    settings: Settings, workdir: Path, seconds: float, *, run: str, customers: int
) -> dict[str, Any]:
    """Events/s published directly, requests/s of single charges and events/s of batches
    through the API, each for ``seconds``; then the p99 latency of single charges at half
    the single-charge rate, for ``seconds`` each: the 202 alone, the 202 with a charges
    worker applying them, and ``Prefer: wait`` with the same worker."""
    own = settings.model_copy(
        update={
            "topic_charges": f"{settings.topic_charges}-api",
            "topic_usage": f"{settings.topic_usage}-api",
            "topic_alerts": f"{settings.topic_alerts}-api",
            "topic_payouts": f"{settings.topic_payouts}-api",
            "topic_dlq": f"{settings.topic_dlq}-api",
            "consumer_group": f"{settings.consumer_group}-api",
        }
    )
    await ensure_topics(own, partitions=PARTITIONS)
    requests = build_requests(customers, run)
    key = await create_key(own)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    figures: dict[str, Any] = {}
    figures["direct_publish_eps"] = await direct_publish(own, requests.records, seconds)

    api = ApiRun(own, workdir / "api.log")
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    failed = 0
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await api.wait_ready(session)
            # Warm: the connections opened, the key and the flows looked up once.
            warm = await closed_loop(
                session, api.base, requests.singles, headers,
                concurrency=SINGLE_CONCURRENCY, seconds=min(1.0, seconds / 3), expect=202,
            )  # fmt: skip
            if warm.done == 0:
                raise RuntimeError(f"the API accepted no charge: {api.tail()}")
            single = await closed_loop(
                session, api.base, requests.singles, headers,
                concurrency=SINGLE_CONCURRENCY, seconds=seconds, expect=202,
            )  # fmt: skip
            figures["api_single_rps"] = single.done / single.seconds
            batches = [("/v1/events", body) for body in requests.batches]
            batch = await closed_loop(
                session, api.base, batches, headers,
                concurrency=BATCH_CONCURRENCY, seconds=seconds, expect=202,
            )  # fmt: skip
            figures["api_batch_eps"] = batch.done * BATCH_EVENTS / batch.seconds
            failed += single.failed + batch.failed

            # Latency at half the single-charge capacity: the 202 first, with no worker
            # (an answer the broker's acknowledgement makes; nothing applies them yet), then
            # again and with Prefer: wait while a charges worker applies them beside it.
            rate = figures["api_single_rps"] / 2
            count = max(1, math.ceil(rate * seconds))
            quick, applied, waiting = (
                [
                    single_request(e)
                    for e in charge_events(count, customers, f"{run}{tag}", seed=seed)
                ]
                for tag, seed in (("api-lat-", 14), ("api-lat-applied-", 16), ("api-wait-", 15))
            )
            latencies, late = await at_rate(
                session, api.base, quick, headers, rate, frozenset({202})
            )
            figures["api_latency_p99_ms"] = p99(latencies) * 1000
            failed += late
            await skip_to_end(own, own.consumer_group, own.topic_charges)
            worker = WorkerRun(own, workdir / "api-worker.log", kinds=("charges",))
            try:
                first = await _first_verdict(session, api, headers, run, customers)
                latencies, late = await at_rate(
                    session, api.base, applied, headers, rate, frozenset({202})
                )
                figures["api_latency_applying_p99_ms"] = p99(latencies) * 1000
                # The worker caught up with them (and the first verdict's) before the next.
                await worker.wait_events(first + count, limit_s=120)
                # A 202 here is a verdict that did not come in time: its wait is in the p99.
                latencies, wait_late = await at_rate(
                    session, api.base, waiting, {**headers, "Prefer": f"wait={WAIT_S}"}, rate,
                    frozenset({201, 202}),
                )  # fmt: skip
                figures["api_wait_latency_p99_ms"] = p99(latencies) * 1000
                figures["api_latency_rate_rps"] = rate
                failed += late + wait_late
            finally:
                worker.stop()
    finally:
        api.stop()
    figures["api_failed_requests"] = failed
    return figures
