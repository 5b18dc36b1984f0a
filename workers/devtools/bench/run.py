"""``chargeline bench``: throughput, limits and latency on this machine, in one run.

Every figure is measured in the same run on the same servers, so the ratios (throughput
against raw COPY, against the naive per-event consumer) mean something on a shared, noisy
machine. Phases:

1. publish a mixed load (80% usage across customers that hold grants, 20% charges across
   20 flows, 5% exact duplicates, 0.1% malformed);
2. raw consume: read it all with no processing (the broker's limit);
3. drain: one ``chargeline worker all`` process applies the whole load (throughput, CPU
   seconds per 1,000 events, peak RSS);
4. raw COPY of the same rows into tables with the same unique indexes (Postgres's limit);
5. naive: the same worker with batches of one event, so one transaction and one offset
   commit per event (the baseline every peer is compared with); and, for reference, a
   floor under it: two bare statements per event;
6. the same mix at a fixed rate, half the measured throughput, with depletions of fresh
   customers threaded through (one record in 25): end-to-end latency (record append to
   database commit, from the worker's histogram) and alert latency (depleting record's
   append to the alert's append on billing.alerts);
7. replay: a new consumer group re-reads the whole load (all duplicates).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import aiohttp
import asyncpg
import orjson
import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from rich.console import Console
from rich.table import Table

from workers import db
from workers.devtools.bench.profile import DrainProfile
from workers.kafka import ensure_topics, make_producer, security_options
from workers.settings import Settings

if TYPE_CHECKING:
    from workers.devtools.devstack import LocalStack

console = Console(stderr=True)

CUSTOMERS = 10_000
PHASE_LIMIT_S = 180.0  # no phase may hang the whole run
FLOWS = 20
PARTITIONS = 6


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
    unique_usage, unique_charges = [], []
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
    usage_only = unique_usage[customers:] or unique_usage  # once: a copy per pick was O(n^2)
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


def _charge(flow: str, customer: str, reference: str, rng: random.Random) -> tuple[bytes, bytes]:
    event = {
        "type": "charge", "flow_id": flow, "customer_ref": customer, "reference": reference,
        "amount": rng.randint(1, 50_000), "currency": rng.choice(("EUR", "USD", "JPY")),
        "metadata": {"job": reference},
    }  # fmt: skip
    return customer.encode(), orjson.dumps(event)


async def publish(settings: Settings, load: Load) -> float:
    producer = make_producer(settings, client_id="chargeline-bench")
    await producer.start()
    started = time.monotonic()
    try:
        for topic, records in (
            (settings.topic_usage, load.usage),
            (settings.topic_charges, load.charges),
        ):
            pending = []
            for key, value in records:
                pending.append(await producer.send(topic, value=value, key=key))
                if len(pending) >= 20_000:
                    await asyncio.gather(*pending)
                    pending.clear()
            await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.monotonic() - started


async def raw_consume(settings: Settings, total: int) -> float:
    """Records per second reading both topics with no processing at all."""
    consumer = AIOKafkaConsumer(
        group_id=None, enable_auto_commit=False, max_partition_fetch_bytes=8 << 20,
        fetch_max_bytes=64 << 20, **security_options(settings),
    )  # fmt: skip
    await consumer.start()
    try:
        tps = [
            TopicPartition(topic, p)
            for topic in (settings.topic_usage, settings.topic_charges)
            for p in range(PARTITIONS)
        ]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen = 0
        started = time.monotonic()
        while seen < total:
            batch = await consumer.getmany(timeout_ms=500, max_records=50_000)
            seen += sum(len(records) for records in batch.values())
        return total / (time.monotonic() - started)
    finally:
        await consumer.stop()


def _poll_pause(events: float, at_least: float, first: float | None, now: float) -> float:
    """Seconds until the next poll of the worker's metrics: 50 ms around the start and the
    end of a drain, where the poll times are the measurement; up to a second in between,
    since each scrape renders every metric in the worker (20 a second took 3% of its CPU).
    """
    if first is None or events <= 0 or now <= first:
        return 0.05
    remaining_s = (at_least - events) / (events / (now - first))
    return min(1.0, max(0.05, remaining_s / 2))


class WorkerRun:
    """A real ``chargeline worker all`` process, watched through its /metrics."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self.port = _free_port()
        env = {
            **os.environ,
            **settings.model_copy(update={"metrics_port": self.port}).as_env(),
        }
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "workers.cli.main", "worker", "all"],
                env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.ps = psutil.Process(self.process.pid)

    async def metrics(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}/metrics"
        try:
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                text = await response.text()
        except aiohttp.ClientError:
            return {}
        samples: dict[str, Any] = {"events": 0.0, "lag_buckets": {}, "lag_count": 0.0}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "chargeline_events_total":
                    samples["events"] += s.value
                elif s.name == "chargeline_event_lag_seconds_bucket":
                    le = float(s.labels["le"])
                    samples["lag_buckets"][le] = samples["lag_buckets"].get(le, 0.0) + s.value
                elif s.name == "chargeline_event_lag_seconds_count":
                    samples["lag_count"] += s.value
        return samples

    async def wait_events(self, at_least: float, *, limit_s: float = 900) -> tuple[float, float]:
        """(when processing started, when ``at_least`` events were counted).

        The start is the last poll that still saw no event: a little early (by at most one
        poll interval, which only lowers the rate), and never the moment the last one is
        counted, even when a small load drains between two polls."""
        first = None
        idle_until = time.monotonic()
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}")
            polled = time.monotonic()
            events = (await self.metrics()).get("events", 0.0)
            now = time.monotonic()
            if first is None:
                if events > 0:
                    first = idle_until
                else:
                    idle_until = polled
            if events >= at_least:
                return first if first is not None else idle_until, now
            await asyncio.sleep(_poll_pause(events, at_least, first, now))
        raise TimeoutError(f"worker did not reach {at_least} events in {limit_s}s")

    def cpu_seconds(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def peak_rss_mib(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def raw_copy(settings: Settings, load: Load) -> float:
    """Rows per second COPYed into copies of the usage and charges tables (same unique
    indexes), from the same events: what Postgres itself allows on this machine."""
    conn = await asyncpg.connect(settings.dsn)
    try:
        # Unlogged tables in shared buffers, like the issue's anchor ("COPY into an unlogged
        # table"); temporary ones live in temp_buffers (8 MB), which a large load outgrows.
        await conn.execute(
            "DROP TABLE IF EXISTS bench_usage, bench_charges;"
            "CREATE UNLOGGED TABLE bench_usage (LIKE usage_events INCLUDING ALL);"
            "CREATE UNLOGGED TABLE bench_charges (LIKE charges INCLUDING ALL)"
        )
        usage_rows: list[tuple[Any, ...]] = []
        charge_rows: list[tuple[Any, ...]] = []
        seen_u, seen_c = set(), set()
        now = time.time()
        from datetime import UTC, datetime

        at = datetime.fromtimestamp(now, UTC)
        for key, value in load.usage:
            try:
                event = orjson.loads(value)
            except orjson.JSONDecodeError:
                continue
            if event["type"] != "usage" or (key, event["reference"]) in seen_u:
                continue
            seen_u.add((key, event["reference"]))
            usage_rows.append(
                (
                    event["customer_ref"],
                    event["reference"],
                    event["tokens"],
                    event.get("feature"),
                    at,
                    b"f" * 32,
                    "t",
                    0,
                    len(usage_rows),
                )
            )
        for _key, value in load.charges:
            event = orjson.loads(value)
            if (event["flow_id"], event["reference"]) in seen_c:
                continue
            seen_c.add((event["flow_id"], event["reference"]))
            charge_rows.append(
                (
                    event["flow_id"],
                    event["reference"],
                    event["customer_ref"],
                    event["amount"],
                    event["currency"],
                    at,
                    b"f" * 32,
                    value.decode(),
                    "t",
                    0,
                    len(charge_rows),
                )
            )
        started = time.monotonic()
        async with conn.transaction():
            await conn.copy_records_to_table(
                "bench_usage", records=usage_rows,
                columns=("customer_ref", "reference", "tokens", "feature", "occurred_at",
                         "fingerprint", "source_topic", "source_partition", "source_offset"),
            )  # fmt: skip
            await conn.copy_records_to_table(
                "bench_charges", records=charge_rows,
                columns=("flow_id", "reference", "customer_ref", "amount", "currency",
                         "occurred_at", "fingerprint", "payload", "source_topic",
                         "source_partition", "source_offset"),
            )  # fmt: skip
        return (len(usage_rows) + len(charge_rows)) / (time.monotonic() - started)
    finally:
        await conn.execute("DROP TABLE IF EXISTS bench_usage, bench_charges")
        await conn.close()


async def prepare_database(settings: Settings) -> None:
    """Schema and the load's flows."""
    await db.migrate(settings.dsn)
    conn = await asyncpg.connect(settings.dsn)
    try:
        for n in range(FLOWS):
            await conn.execute(db.QUERIES["flow_create"], f"flow-{n:02d}", f"Flow {n}", "default")
    finally:
        await conn.close()


async def naive_pipeline(settings: Settings, workdir: Path, budget_s: float = 10.0) -> float:
    """The baseline: the same worker doing the same work (validation, dedup, ledger, alerts,
    outbox, offset commit) one event per transaction, on a database of its own so that the
    load is as new to it as it was to the drain."""
    conn = await asyncpg.connect(settings.dsn)
    try:
        await conn.execute("DROP DATABASE IF EXISTS bench_naive")
        await conn.execute("CREATE DATABASE bench_naive")
    finally:
        await conn.close()
    own = settings.model_copy(
        update={
            "database_url": SecretStr(settings.dsn.rsplit("/", 1)[0] + "/bench_naive"),
            "consumer_group": f"{settings.consumer_group}-naive",
            "topic_alerts": f"{settings.topic_alerts}-naive",
            "topic_payouts": f"{settings.topic_payouts}-naive",
            "topic_dlq": f"{settings.topic_dlq}-naive",
            "batch_max_records": 1,
        }
    )
    await prepare_database(own)
    worker = WorkerRun(own, workdir / "naive.log")
    try:
        await worker.wait_events(1, limit_s=120)
        started, before = time.monotonic(), (await worker.metrics())["events"]
        await asyncio.sleep(budget_s)
        done = (await worker.metrics())["events"] - before
        return float(done / (time.monotonic() - started))
    finally:
        worker.stop()


async def naive_sql(settings: Settings, budget_s: float = 10.0) -> float:
    """For reference, a floor under the naive baseline: only a dedup row and a balance
    update per event, one transaction each, no validation, alerts or offset commits."""
    conn = await asyncpg.connect(settings.dsn)
    consumer = AIOKafkaConsumer(
        group_id=None, enable_auto_commit=False, **security_options(settings)
    )
    await consumer.start()
    try:
        await conn.execute(
            "CREATE TABLE naive_usage (customer_ref text, reference text, tokens bigint, "
            "PRIMARY KEY (customer_ref, reference));"
            "CREATE TABLE naive_balance (customer_ref text PRIMARY KEY, balance bigint)"
        )
        tps = [TopicPartition(settings.topic_usage, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        done = 0
        started = time.monotonic()
        while time.monotonic() - started < budget_s:
            batch = await consumer.getmany(timeout_ms=200, max_records=500)
            for records in batch.values():
                for record in records:
                    try:
                        event = orjson.loads(record.value)
                        tokens = int(event.get("tokens", 0))
                    except (orjson.JSONDecodeError, ValueError):
                        continue
                    async with conn.transaction():
                        inserted = await conn.fetchval(
                            "INSERT INTO naive_usage VALUES ($1, $2, $3) ON CONFLICT DO NOTHING "
                            "RETURNING 1", event["customer_ref"], event["reference"], tokens,
                        )  # fmt: skip
                        if inserted:
                            await conn.execute(
                                "INSERT INTO naive_balance VALUES ($1, -$2::bigint) "
                                "ON CONFLICT (customer_ref) DO UPDATE "
                                "SET balance = naive_balance.balance - $2::bigint",
                                event["customer_ref"], tokens,
                            )  # fmt: skip
                    done += 1
        return done / (time.monotonic() - started)
    finally:
        await consumer.stop()
        await conn.close()


def python_loop_seconds(iterations: int = 5_000_000) -> float:
    """Seconds for a fixed pure-Python loop, best of three: how fast this machine runs Python
    today. Figures of runs on different days compare only after scaling by it (the shared
    machines here have run the same code 2.5 times slower from one day to the next)."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        total = 0
        for n in range(iterations):
            total += n
        best = min(best, time.perf_counter() - started)
    return best


def server_cpu_seconds(servers: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each server in ``servers`` (name -> the pid it runs as):
    that process and all its descendants, and the children it has reaped.

    The reaped count because autovacuum workers live for one table each: once the
    postmaster has reaped one, its CPU shows only in the postmaster's children times. Only
    the bench's own servers are counted, not other servers of the same kind on the machine.
    """
    totals = {}
    for server, pid in servers.items():
        total = 0.0
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(pid)
            for process in (root, *root.children(recursive=True)):
                with contextlib.suppress(psutil.NoSuchProcess):  # gone meanwhile: reaped
                    times = process.cpu_times()
                    total += times.user + times.system
                    total += times.children_user + times.children_system
        totals[server] = total
    return totals


MACHINE_TIMES = ("machine", "machine_busy", "machine_steal")


def cpu_seconds_by_process(worker: WorkerRun, servers: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far by the worker, the ``servers``, this process (which
    generates the fixed-rate load) and the whole machine, summed over its CPUs: all its time
    (``machine``), the busy part, and the part stolen (the hypervisor gave this VM's CPUs
    to someone else)."""
    own = psutil.Process().cpu_times()
    machine = psutil.cpu_times()
    # guest time is counted in user time already (Linux); the other fields are not there
    # on every platform.
    total = sum(machine) - getattr(machine, "guest", 0.0) - getattr(machine, "guest_nice", 0.0)
    return {
        "worker": worker.cpu_seconds(),
        **server_cpu_seconds(servers),
        "load_generator": own.user + own.system,
        "machine": total,
        "machine_busy": total - machine.idle - getattr(machine, "iowait", 0.0),
        "machine_steal": getattr(machine, "steal", 0.0),
    }


def cpu_spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds used between two ``cpu_seconds_by_process`` readings."""
    return {name: after[name] - before[name] for name in before}


def machine_share_pct(spent: dict[str, float], part: str) -> float:
    """``part`` (``machine_busy``, ``machine_steal``) as a share of the machine's time."""
    return 100 * spent[part] / spent["machine"] if spent["machine"] > 0 else 0.0


def cpu_cores_between(
    before: dict[str, float], after: dict[str, float], seconds: float
) -> dict[str, float]:
    """Cores each process kept busy between two ``cpu_seconds_by_process`` readings, and
    the share of the machine's CPU time that was busy (``machine_busy_pct``)."""
    spent = cpu_spent(before, after)
    cores = {
        name: value / seconds
        for name, value in spent.items()
        if name not in MACHINE_TIMES and seconds > 0
    }
    cores["machine_busy_pct"] = machine_share_pct(spent, "machine_busy")
    return cores


def histogram_quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus's histogram_quantile over cumulative buckets: linear within a bucket."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total == 0:
        return float("nan")
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            width = count - lower_count
            return lower_bound + (bound - lower_bound) * (
                (rank - lower_count) / width if width else 1
            )
        lower_bound, lower_count = bound, count
    return bounds[-2]


def _diff(after: dict[float, float], before: dict[float, float]) -> dict[float, float]:
    return {le: after[le] - before.get(le, 0.0) for le in after}


DEPLETING_EVERY = 25  # one record in 25 of the fixed-rate load belongs to a depletion


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
    sends, taking as little as it can of the CPU it shares with the worker and the servers
    (building a record and partitioning it were 10 of the 25 us it cost to send)."""
    rng = random.Random(7)  # noqa: S311 -- benchmark data, not secrets
    partitioner, partitions = DefaultPartitioner(), list(range(PARTITIONS))
    planned = []
    for n in range(records):
        kind, (key, value), depleting = fixed_rate_record(n, customers, run, rng)
        partition = partitioner(key, partitions, partitions)
        planned.append(Planned(topics[kind], key, value, partition, depleting))
    return planned


SEND_TICK_S = 0.002


async def send_at_rate(
    producer: AIOKafkaProducer, planned: list[Planned], rate: float, seconds: float
) -> tuple[int, float, dict[str, int], list[asyncio.Future[Any]]]:
    """Send ``planned`` at ``rate`` records/s for ``seconds``.

    Every tick, the records due are appended to one batch per partition, stamped with the
    time they are sent (their CreateTime, from which the worker measures latency), and each
    batch is sent as it is: no linger. aiokafka's ``send`` cost about 15 us of CPU per
    record in Python, on the cores the worker and the servers need; its batch builder, in C,
    a small part of that. Returns the records sent, the seconds it took, the send time (ms)
    of each depleting record by reference, and the acks to wait for.
    """
    acks: list[asyncio.Future[Any]] = []
    sent: dict[str, int] = {}
    count = 0
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < seconds:
        due = min(len(planned), int(elapsed * rate))
        now_ms = int(time.time() * 1000)
        batches: dict[tuple[str, int], Any] = {}
        while count < due:
            topic, key, value, partition, depleting = planned[count]
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
        await asyncio.sleep(SEND_TICK_S)
    return count, time.monotonic() - started, sent, acks


async def fixed_rate(
    settings: Settings,
    worker: WorkerRun,
    rate: float,
    seconds: float,
    *,
    run: str,
    already: int,
    customers: int,
    servers: dict[str, int],
) -> dict[str, Any]:
    """The mixed load at ``rate`` records/s for ``seconds``, with depletions threaded
    through. Returns p50/p99 end-to-end latency and the p99 alert latency, in ms, the rate
    sent and the CPU each process used meanwhile."""
    before = (await worker.metrics())["lag_buckets"]
    producer = make_producer(settings, client_id="chargeline-bench-rate")
    await producer.start()
    topics = {"usage": settings.topic_usage, "charges": settings.topic_charges}
    planned = plan_fixed_rate(math.ceil(rate * seconds), customers, run, topics)
    cpu_before = cpu_seconds_by_process(worker, servers)
    try:
        count, sending_s, sent, acks = await send_at_rate(producer, planned, rate, seconds)
        # Where the machine's CPU went while the load ran: the producer shares it too.
        cpu = cpu_cores_between(cpu_before, cpu_seconds_by_process(worker, servers), sending_s)
        await asyncio.gather(*acks)
    finally:
        await producer.stop()
    await worker.wait_events(already + count, limit_s=120)
    deadline = time.monotonic() + 60
    alert_latencies: list[float] = []
    consumer = AIOKafkaConsumer(
        group_id=None, enable_auto_commit=False, **security_options(settings)
    )
    await consumer.start()
    try:
        tps = [TopicPartition(settings.topic_alerts, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while len(alert_latencies) < len(sent) and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    alert = orjson.loads(record.value)
                    reference = alert["cause"]["reference"]
                    if alert["type"] == "credit_balance_depleted" and reference in sent:
                        alert_latencies.append(record.timestamp - sent[reference])
    finally:
        await consumer.stop()
    await asyncio.sleep(1)
    lag = _diff((await worker.metrics())["lag_buckets"], before)
    alert_latencies.sort()
    return {
        "latency_records": float(count),
        "latency_p50_ms": histogram_quantile(0.5, lag) * 1000,
        "latency_p99_ms": histogram_quantile(0.99, lag) * 1000,
        "alert_latency_p99_ms": (
            alert_latencies[min(len(alert_latencies) - 1, int(len(alert_latencies) * 0.99))]
            if alert_latencies
            else float("nan")
        ),
        "alerts_measured": float(len(alert_latencies)),
        "fixed_rate_eps": count / sending_s,
        "fixed_rate_machine_busy_pct": cpu.pop("machine_busy_pct"),
        "fixed_rate_cpu_cores": cpu,
    }


async def run_bench(  # noqa: PLR0915 -- the phases in order, as the docstring lists them
    settings: Settings,
    *,
    events: int,
    json_path: Path | None,
    fixed_rate_s: float = 20.0,
    naive_s: float = 10.0,
    profile_dir: Path | None = None,
) -> dict[str, Any]:
    from workers.devtools.devstack import LocalStack

    own_stack = not (
        os.environ.get("CHARGELINE_DATABASE_URL")
        and os.environ.get("CHARGELINE_KAFKA_BOOTSTRAP_SERVERS")
    )
    stack = None
    if own_stack:
        console.print("starting the embedded stack (fsync on)...")
        stack = await asyncio.to_thread(
            LocalStack.start, fsync=True, statement_stats=profile_dir is not None
        )
        env = stack.env()
        settings = settings.model_copy(
            update={
                "database_url": SecretStr(
                    env["CHARGELINE_DATABASE_URL"].rsplit("/", 1)[0] + "/postgres"
                ),
                "kafka_bootstrap_servers": env["CHARGELINE_KAFKA_BOOTSTRAP_SERVERS"],
                "kafka_idempotent_producer": False,
            }
        )
    # The servers whose CPU is measured: the embedded stack's only, which this run owns.
    servers = {} if stack is None else _server_pids(stack)
    run = uuid.uuid4().hex[:6]
    settings = settings.model_copy(
        update={
            "topic_charges": f"bench{run}.charges",
            "topic_usage": f"bench{run}.usage",
            "topic_alerts": f"bench{run}.alerts",
            "topic_payouts": f"bench{run}.payouts",
            "topic_dlq": f"bench{run}.dlq",
            "consumer_group": f"bench{run}",
            "log_level": "warning",
            "log_format": "json",
        }
    )
    workdir = Path(tempfile.mkdtemp(prefix="chargeline-bench-"))
    results: dict[str, Any] = {"events": events}
    python_loop = python_loop_seconds()
    try:
        await prepare_database(settings)
        await ensure_topics(settings, partitions=PARTITIONS)

        console.print(f"building a load of {events:,} events...")
        load = build_load(events, run=f"{run}-")
        console.print("publishing...")
        results["publish_s"] = await publish(settings, load)
        console.print("raw consume...")
        results["raw_consume_eps"] = await raw_consume(settings, load.total)

        console.print("draining with one worker process...")
        worker = WorkerRun(settings, workdir / "worker.log")
        try:
            profile = None
            if profile_dir is not None:
                profile = await DrainProfile.start(profile_dir, settings.dsn, worker.ps.pid)
            cpu_before = cpu_seconds_by_process(worker, servers)
            first, last = await worker.wait_events(load.total)
            spent = cpu_spent(cpu_before, cpu_seconds_by_process(worker, servers))
            if profile is not None:
                results["profile"] = await profile.finish(load.total)
            results["drain_cpu_steal_pct"] = machine_share_pct(spent, "machine_steal")
            results["throughput_eps"] = load.total / (last - first)
            results["drain_s"] = last - first
            results["cpu_s_per_1k_events"] = spent["worker"] / load.total * 1000
            for server in servers:  # the servers' processes are ours to measure
                results[f"{server}_cpu_s_per_1k_events"] = spent[server] / load.total * 1000
            results["worker_peak_rss_mib"] = worker.peak_rss_mib()
            console.print("fixed-rate load at half capacity...")
            try:
                results.update(
                    await asyncio.wait_for(
                        fixed_rate(
                            settings,
                            worker,
                            results["throughput_eps"] / 2,
                            fixed_rate_s,
                            run=f"{run}-",
                            already=load.total,
                            customers=customer_count(events),
                            servers=servers,
                        ),
                        timeout=PHASE_LIMIT_S,
                    )
                )
            except TimeoutError:
                # Reported, not hidden: the figures stay NaN and the table says why.
                console.print(f"[red]fixed-rate phase did not finish in {PHASE_LIMIT_S}s[/red]")
                results.update(
                    latency_records=0.0,
                    latency_p50_ms=float("nan"),
                    latency_p99_ms=float("nan"),
                    alert_latency_p99_ms=float("nan"),
                    alerts_measured=0.0,
                    timed_out="fixed_rate",
                )
            # With --profile: what autovacuum did meanwhile, on the tables the drain filled.
            autovacuum = await profile.autovacuum_since_mark() if profile is not None else None
            if autovacuum is not None:
                results["profile"]["autovacuum_fixed_rate"] = autovacuum
        finally:
            worker.stop()

        console.print("raw COPY...")
        results["raw_copy_eps"] = await asyncio.wait_for(raw_copy(settings, load), PHASE_LIMIT_S)
        console.print("naive: the same worker, one event per transaction...")
        results["naive_eps"] = await asyncio.wait_for(
            naive_pipeline(settings, workdir, naive_s), PHASE_LIMIT_S
        )
        results["naive_sql_eps"] = await asyncio.wait_for(
            naive_sql(settings, naive_s), PHASE_LIMIT_S
        )

        console.print("replay (a new group re-reads everything: all duplicates)...")
        replayer = WorkerRun(
            settings.model_copy(update={"consumer_group": f"bench{run}-replay"}),
            workdir / "replay.log",
        )
        try:
            # The replay group reads the fixed-rate records too.
            first, last = await replayer.wait_events(load.total + results["latency_records"])
            results["replay_eps"] = (load.total + results["latency_records"]) / (last - first)
        finally:
            replayer.stop()
    finally:
        if stack is not None:
            await asyncio.to_thread(stack.stop)
    results["ratio_throughput_to_raw_copy"] = results["throughput_eps"] / results["raw_copy_eps"]
    results["ratio_throughput_to_naive"] = results["throughput_eps"] / results["naive_eps"]
    results["ratio_throughput_to_raw_consume"] = (
        results["throughput_eps"] / results["raw_consume_eps"]
    )
    results["machine"] = {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "python_loop_s": python_loop,
    }
    show(results)
    if "profile" in results:
        show_profile(results["profile"], profile_dir)
    if json_path is not None:
        document = orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
        await asyncio.to_thread(json_path.write_bytes, document)
        console.print(f"wrote {json_path}")
    return results


def _server_pids(stack: LocalStack) -> dict[str, int]:
    pids = {"postgres": stack.postgres.pid, "broker": stack.broker.pid}
    return {server: pid for server, pid in pids.items() if pid is not None}


def _half_capacity_rows(results: dict[str, Any]) -> list[tuple[str, float, str]]:
    """What the machine did during the fixed-rate load: the latency figures' context."""
    if "fixed_rate_cpu_cores" not in results:
        return []  # the phase timed out
    cores = results["fixed_rate_cpu_cores"]
    return [
        ("  rate sent (events/s)", results["fixed_rate_eps"], "half the throughput"),
        ("  machine CPU busy (%)", results["fixed_rate_machine_busy_pct"], "while it was sent"),
        *(
            (f"  {name.replace('_', ' ')} (cores)", cores[name], "while it was sent")
            for name in ("worker", "postgres", "broker", "load_generator")
            if name in cores
        ),
    ]


def show(results: dict[str, Any]) -> None:
    table = Table(title=f"chargeline bench: {results['events']:,} events")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target / note")
    rows = [
        ("throughput (events/s, one worker)", results["throughput_eps"], ">= 30,000"),
        ("raw consume (records/s)", results["raw_consume_eps"], "broker limit"),
        ("raw COPY (rows/s)", results["raw_copy_eps"], "Postgres limit"),
        ("naive (events/s)", results["naive_eps"], "same worker, one event per transaction"),
        ("naive, SQL only (events/s)", results["naive_sql_eps"], "2 statements per event"),
        ("throughput / raw COPY", results["ratio_throughput_to_raw_copy"], ">= 0.40"),
        ("throughput / naive", results["ratio_throughput_to_naive"], ">= 50"),
        ("latency p50 (ms) at half capacity", results["latency_p50_ms"], ""),
        ("latency p99 (ms) at half capacity", results["latency_p99_ms"], "< 500"),
        ("alert latency p99 (ms)", results["alert_latency_p99_ms"], "< 1,000"),
        *_half_capacity_rows(results),
        ("replay, all duplicates (events/s)", results["replay_eps"], ">= 60,000"),
        ("worker peak RSS (MiB)", results["worker_peak_rss_mib"], "< 256"),
        ("CPU s per 1,000 events", results["cpu_s_per_1k_events"], "the worker"),
        (
            "CPU steal during the drain (%)",
            results.get("drain_cpu_steal_pct", 0.0),
            "machine-wide, taken by the hypervisor",
        ),
        (
            "Python loop (s), machine speed",
            results["machine"]["python_loop_s"],
            "5M additions; compare runs by it",
        ),
        *(
            (f"  {server} CPU s per 1,000 events", results[key], "during the drain")
            for server in ("postgres", "broker")
            if (key := f"{server}_cpu_s_per_1k_events") in results
        ),
    ]
    for name, value, note in rows:
        shown = (
            f"{value:,.0f}" if value >= 100 else f"{value:.2f}" if value >= 1 else f"{value:.4f}"
        )
        table.add_row(name, shown, note)
    Console().print(table)


def show_profile(profile: dict[str, Any], out_dir: Path | None) -> None:
    """Where the time went (``--profile``): the worker's hottest code and the statements
    Postgres spent the most time on, in the drain; autovacuum's work in the drain and at
    half capacity."""
    out = Console()
    worker = profile.get("worker")
    if worker and worker["samples"]:
        for key, title in (
            ("self", "running"),
            ("ours_inclusive", "chargeline's code, on the stack"),
        ):
            table = Table(
                title=f"worker during the drain, {title}: % of {worker['samples']:,} samples"
            )
            table.add_column("function (file)", no_wrap=True, overflow="ellipsis", max_width=64)
            table.add_column("%", justify="right")
            for frame, share in worker[key]:
                table.add_row(frame, f"{share:.1f}")
            out.print(table)
    statements = profile.get("postgres_statements")
    if statements:
        table = Table(title="Postgres during the drain: statements by time")
        table.add_column("statement", no_wrap=True, overflow="ellipsis", max_width=24)
        for name in ("calls", "rows", "exec ms", "plan ms", "us/event"):
            table.add_column(name, justify="right", no_wrap=True)
        for row in statements:
            table.add_row(
                row["statement"],
                f"{row['calls']:,}",
                f"{row['rows']:,}",
                f"{row['exec_ms']:,.0f}",
                f"{row['plan_ms']:,.0f}",
                f"{row['us_per_event']:.2f}",
            )
        out.print(table)
    for key, phase in (
        ("autovacuum", "during the drain"),
        ("autovacuum_fixed_rate", "at half capacity"),
    ):
        if profile.get(key):
            out.print(_autovacuum_table(profile[key], f"Postgres {phase}: autovacuum"))
    for note in profile.get("notes", []):
        out.print(f"[yellow]profile: {note}[/yellow]")
    if out_dir is not None:
        out.print(
            f"profile in {out_dir}: worker.folded (collapsed stacks, for speedscope or "
            "flamegraph.pl); the figures above are in the JSON under 'profile'. A profiled "
            "run's figures carry the profilers' cost."
        )


def _autovacuum_table(maintenance: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=f"{title}, outside the statements")
    table.add_column("table")
    for name in ("vacuums", "vacuum ms", "analyzes", "analyze ms"):
        table.add_column(name, justify="right")
    for row in maintenance:
        table.add_row(
            row["table"],
            str(row["vacuums"]),
            f"{row['vacuum_ms']:,.0f}",
            str(row["analyzes"]),
            f"{row['analyze_ms']:,.0f}",
        )
    return table
