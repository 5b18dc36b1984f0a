"""`chargeline bench` runs every phase end to end (a small load, short phases) and writes
every figure the performance issue names. It measures nothing here: speed is the bench's
business, not the tests' (these machines are shared and noisy)."""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import orjson
import psutil
import pytest

from tests.support import Stack
from workers.devtools.bench.measure import server_cpu_seconds
from workers.settings import Settings

KEYS = (
    "events", "throughput_eps", "raw_consume_eps", "raw_copy_eps", "naive_eps",
    "latency_p50_ms", "latency_p99_ms", "alert_latency_p99_ms", "replay_eps",
    "worker_peak_rss_mib", "cpu_s_per_1k_events",
    "direct_publish_eps", "api_single_rps", "api_batch_eps", "api_latency_p99_ms",
    "api_wait_latency_p99_ms", "api_latency_applying_p99_ms", "ratio_api_batch_to_direct_publish",
    "machine_throughput_eps", "machine_processes", "cpu_us_per_event",
)  # fmt: skip


def test_bench_runs_every_phase_and_writes_the_figures(tmp_path: Path) -> None:
    # On a stack of its own, as `make bench` runs: --profile needs its Postgres to load
    # pg_stat_statements, and the servers' CPU is measured only there.
    env = {name: value for name, value in os.environ.items() if not name.startswith("CHARGELINE_")}
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable, "-m", "workers.cli.main", "bench", "--events", "3000",
            "--json", str(out), "--fixed-rate-seconds", "1", "--naive-seconds", "2",
            "--profile", str(tmp_path / "profile"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    figures = orjson.loads(out.read_bytes())
    assert figures["events"] == 3000
    for key in KEYS:
        assert isinstance(figures[key], int | float) and math.isfinite(figures[key]), key
        assert figures[key] > 0, key
    # The depletions threaded through the fixed-rate load raised alerts that were measured.
    assert figures["alerts_measured"] >= 1
    # The machine's speed that day, to scale figures of runs on different days by.
    assert figures["machine"]["python_loop_s"] > 0
    assert 0 <= figures["drain_cpu_steal_pct"] <= 100
    # Where the CPU went while the fixed-rate load was sent: the latency figures' context.
    assert figures["fixed_rate_eps"] > 0
    assert 0 < figures["fixed_rate_machine_busy_pct"] <= 100
    cores = figures["fixed_rate_cpu_cores"]
    assert cores["worker"] > 0 and cores["load_generator"] > 0 and cores["postgres"] > 0
    assert figures["postgres_cpu_s_per_1k_events"] > 0
    # The latency curve on the whole machine, its 50% point the headline latency.
    curve = figures["latency_curve"]
    assert [point["load_pct"] for point in curve] == [10, 25, 50, 75]
    for point in curve:
        assert point["rate_eps"] > 0 and point["generator_cores"] > 0, point
        assert {"p50_ms", "p99_ms", "alert_p99_ms"} <= point.keys()
    assert figures["latency_p99_ms"] == curve[2]["p99_ms"]
    assert figures["machine_processes"] == (os.cpu_count() or 1)
    assert "throughput / naive" in done.stdout
    # --profile: the drain's statements, named, and the worker's samples.
    profile = figures["profile"]
    assert profile["notes"] == [], profile["notes"]
    statements = {row["statement"]: row for row in profile["postgres_statements"]}
    assert statements["record_usage"]["calls"] >= 1, statements
    assert statements["record_charges"]["rows"] >= 1, statements
    assert profile["worker"]["samples"] > 0
    # Autovacuum reported for the drain; a run this short may leave it nothing to do, so
    # the list can be empty (maintenance_between's filtering has a unit test of its own).
    assert all(row["vacuums"] + row["analyzes"] > 0 for row in profile["autovacuum"])
    assert any("(workers/" in frame for frame, _ in profile["worker"]["ours_inclusive"])
    assert (tmp_path / "profile" / "worker.folded").stat().st_size > 0
    assert "statements by time" in done.stdout


async def test_postgres_cpu_includes_the_processes_that_have_exited(
    stack: Stack, database_url: str
) -> None:
    # Autovacuum workers and closed connections exit within a phase; their CPU must still be
    # in the phase's Postgres figure, or the bench under-reports what Postgres spent.
    if stack.local is None or stack.local.postgres.pid is None:
        pytest.skip("needs the embedded stack, whose server processes are on this machine")
    servers = {"postgres": stack.local.postgres.pid}
    before = server_cpu_seconds(servers)["postgres"]
    conn = await asyncpg.connect(database_url)
    backend = psutil.Process(conn.get_server_pid())
    await conn.fetchval("SELECT count(*) FROM generate_series(1, 5000000)")
    spent = sum(backend.cpu_times()[:2])
    await conn.close()
    backend.wait(timeout=10)  # reaped by the postmaster: its CPU moves to the children times
    assert spent > 0.1
    # Times are in clock ticks (10 ms) and summed over processes: allow a tick or two.
    assert server_cpu_seconds(servers)["postgres"] - before >= spent - 0.05


async def test_send_at_rate_sends_what_is_due_by_the_end_whatever_the_tick(
    settings: Settings,
) -> None:
    """A coarse tick (the soak's) still sends every record due by ``seconds``: the last
    tick falls at the end, not a tick's worth of load short of it. Each record is stamped
    with the moment it fell due, one every 10 ms at 100 records/s, not with its tick's."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from workers.devtools.bench.load import Planned, send_at_rate
    from workers.kafka import ensure_topics, make_producer

    await ensure_topics(settings, partitions=1)
    planned = [Planned(settings.topic_usage, b"k", b"{}", 0, None) for _ in range(1_000)]
    producer = make_producer(settings)
    await producer.start()
    try:
        count, seconds, _, acks = await send_at_rate(producer, planned, 100, 1.2, tick_s=0.5)
        await asyncio.gather(*acks)
    finally:
        await producer.stop()
    assert count == 120
    assert 1.2 <= seconds < 1.5
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers, auto_offset_reset="earliest"
    )
    await consumer.start()
    stamps: list[int] = []
    try:
        consumer.assign([TopicPartition(settings.topic_usage, 0)])
        while batch := await consumer.getmany(timeout_ms=1_000):
            stamps += [record.timestamp for records in batch.values() for record in records]
    finally:
        await consumer.stop()
    assert len(stamps) == 120
    assert {later - earlier for earlier, later in itertools.pairwise(stamps)} <= {9, 10, 11}
