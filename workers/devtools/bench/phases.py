"""The bench's phases after publishing, each measuring one thing: the drain, the fixed-rate
load at half capacity, the replay, and the limits and baselines the drain is compared with
(raw consume, raw COPY, the naive worker and its two-statement floor). ``run.py`` runs them
in order.

The limits and the baselines run on the same servers in the same run as the drain, so
that the ratios of the worker's throughput to them hold on a machine whose absolute speed
moves from hour to hour.
"""

from __future__ import annotations

import asyncio
import math
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import SecretStr

from workers import db
from workers.devtools.bench.load import (
    FLOWS,
    PARTITIONS,
    SEND_TICK_S,
    Load,
    plan_fixed_rate,
    publish,
    send_at_rate,
)
from workers.devtools.bench.measure import (
    cpu_cores_between,
    cpu_seconds_by_process,
    cpu_spent,
    histogram_quantile,
    histogram_since,
    machine_share_pct,
)
from workers.devtools.bench.profile import DrainProfile
from workers.devtools.bench.worker import WorkerRun
from workers.kafka import client_options, ensure_topics, make_producer
from workers.settings import Settings


async def prepare_database(settings: Settings) -> None:
    """Schema and the load's flows."""
    await db.migrate(settings.dsn)
    conn = await asyncpg.connect(settings.dsn)
    try:
        for n in range(FLOWS):
            await conn.execute(db.QUERIES["flow_create"], f"flow-{n:02d}", f"Flow {n}", "default")
    finally:
        await conn.close()


async def raw_consume(settings: Settings, total: int) -> float:
    """Records per second reading both topics with no processing at all."""
    consumer = AIOKafkaConsumer(
        group_id=None, enable_auto_commit=False, max_partition_fetch_bytes=8 << 20,
        fetch_max_bytes=64 << 20, **client_options(settings),
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


async def drain(
    worker: WorkerRun, events: int, servers: dict[str, int], profile: DrainProfile | None
) -> dict[str, Any]:
    """``worker`` applies the whole published load of ``events``: its throughput, the CPU it
    and the ``servers`` spent per 1,000 events, its peak RSS, the share of the machine's
    CPU stolen meanwhile, and with ``profile`` where the time went."""
    figures: dict[str, Any] = {}
    cpu_before = cpu_seconds_by_process(worker, servers)
    first, last = await worker.wait_events(events)
    spent = cpu_spent(cpu_before, cpu_seconds_by_process(worker, servers))
    if profile is not None:
        figures["profile"] = await profile.finish(events)
    figures["drain_cpu_steal_pct"] = machine_share_pct(spent, "machine_steal")
    figures["throughput_eps"] = events / (last - first)
    figures["drain_s"] = last - first
    figures["cpu_s_per_1k_events"] = spent["worker"] / events * 1000
    for server in servers:  # the servers' processes are ours to measure
        figures[f"{server}_cpu_s_per_1k_events"] = spent[server] / events * 1000
    figures["worker_peak_rss_mib"] = worker.peak_rss_mib()
    return figures


async def replay(settings: Settings, log: Path, records: float) -> float:
    """Events per second of a worker whose consumer group (``settings``) has read nothing:
    it re-reads all ``records``, every one a duplicate."""
    replayer = WorkerRun(settings, log)
    try:
        first, last = await replayer.wait_events(records)
        return records / (last - first)
    finally:
        replayer.stop()


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
        seen_u: set[tuple[bytes, str]] = set()
        seen_c: set[tuple[str, str]] = set()
        at = datetime.fromtimestamp(time.time(), UTC)
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
    consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **client_options(settings))
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
    tick_s: float = SEND_TICK_S,
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
        count, sending_s, sent, acks = await send_at_rate(
            producer, planned, rate, seconds, tick_s=tick_s
        )
        # Where the machine's CPU went while the load ran: the producer shares it too.
        cpu = cpu_cores_between(cpu_before, cpu_seconds_by_process(worker, servers), sending_s)
        await asyncio.gather(*acks)
    finally:
        await producer.stop()
    await worker.wait_events(already + count, limit_s=120)
    deadline = time.monotonic() + 60
    alert_latencies: list[float] = []
    consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **client_options(settings))
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
    lag = histogram_since(before, (await worker.metrics())["lag_buckets"])
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


CURVE_LOADS_PCT = (10, 25, 50, 75)
"""The fixed-rate loads of the latency curve, as shares of the machine's throughput."""


async def machine(
    settings: Settings,
    workdir: Path,
    load: Load,
    *,
    processes: int,
    fixed_rate_s: float,
    send_tick_s: float,
    run: str,
    customers: int,
    servers: dict[str, int],
) -> dict[str, Any]:
    """The whole machine: ``load`` (new references) drained by ``chargeline worker
    --processes N`` on a database and topics of their own, then the latency curve: the
    fixed-rate mix at each share of CURVE_LOADS_PCT of that throughput, for ``fixed_rate_s``
    each, by the same processes. Returns ``machine_throughput_eps``, ``machine_processes``,
    the drain's CPU per event and peak RSS per process, and ``latency_curve``."""
    conn = await asyncpg.connect(settings.dsn)
    try:
        await conn.execute("DROP DATABASE IF EXISTS bench_machine")
        await conn.execute("CREATE DATABASE bench_machine")
    finally:
        await conn.close()
    own = settings.model_copy(
        update={
            "database_url": SecretStr(settings.dsn.rsplit("/", 1)[0] + "/bench_machine"),
            "consumer_group": f"{settings.consumer_group}-machine",
            **{
                f"topic_{name}": f"{getattr(settings, f'topic_{name}')}-machine"
                for name in ("charges", "usage", "alerts", "payouts", "dlq")
            },
        }
    )
    await prepare_database(own)
    await ensure_topics(own, partitions=PARTITIONS)
    await publish(own, load)
    fleet = WorkerRun(own, workdir / "machine.log", processes=processes)
    figures: dict[str, Any] = {"machine_processes": processes}
    try:
        drained = await drain(fleet, load.total, servers, None)
        figures["machine_throughput_eps"] = drained["throughput_eps"]
        figures["machine_cpu_s_per_1k_events"] = drained["cpu_s_per_1k_events"]
        figures["machine_peak_rss_mib"] = drained["worker_peak_rss_mib"]
        curve = []
        already = load.total
        for pct in CURVE_LOADS_PCT:
            point = await asyncio.wait_for(
                fixed_rate(
                    own, fleet, figures["machine_throughput_eps"] * pct / 100, fixed_rate_s,
                    run=f"{run}c{pct}-", already=already, customers=customers, servers=servers,
                    tick_s=send_tick_s,
                ),
                timeout=fixed_rate_s + 240,
            )  # fmt: skip
            already += int(point["latency_records"])
            curve.append(
                {
                    "load_pct": pct,
                    "rate_eps": point["fixed_rate_eps"],
                    "p50_ms": point["latency_p50_ms"],
                    "p99_ms": point["latency_p99_ms"],
                    "alert_p99_ms": point["alert_latency_p99_ms"],
                    "alerts_measured": point["alerts_measured"],
                    "generator_cores": point["fixed_rate_cpu_cores"]["load_generator"],
                    "machine_busy_pct": point["fixed_rate_machine_busy_pct"],
                    "cores": point["fixed_rate_cpu_cores"],
                }
            )
        figures["latency_curve"] = curve
    finally:
        fleet.stop()
    return figures
