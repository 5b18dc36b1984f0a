"""``chargeline soak``: a long run at a fixed rate, with crashes, that shows whether
chargeline stays healthy: memory flat, latency flat, the outbox drained, the invariants kept.

On an embedded stack of its own (Postgres with fsync on, as the bench's):

1. capacity: the bench's mixed load of 100,000 events, drained by one ``worker all``
   process (the bench's drain); its throughput sets the rate (a quarter of it, unless
   ``--rate``), and its grants are what the soak's usage eats;
2. the soak: the bench's fixed-rate mix (usage of those customers, charges over the flows,
   depletions of fresh customers so that alerts fire) with 5% exact duplicates and 0.1%
   malformed records (dead letters), sent at the rate for the whole run, in chunks of 10 s
   planned in a thread while the previous one is sent. Two worker processes apply it
   (``fleet.py``): the ingest process, SIGKILLed and started again every crash period, and
   the outbox relay, SIGTERMed and started again once. Every 10 s the soak reads both
   processes' RSS, the ingest process's latency histogram and the outbox's backlog;
   ``chargeline verify`` runs after the first minute;
3. the end: the outbox's backlog as the load stops; then, once everything sent is applied
   and published, both processes SIGTERMed, ``chargeline verify`` again, the tables' sizes.

The figures are computed in ``figures.py``, shown by ``report.py``.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from pydantic import SecretStr
from rich.console import Console

from workers.devtools.bench.load import PARTITIONS, build_load, customer_count, publish
from workers.devtools.bench.measure import python_loop_seconds, server_pids
from workers.devtools.bench.phases import drain, prepare_database
from workers.devtools.bench.worker import WorkerRun
from workers.devtools.soak.figures import (
    acceptance,
    early_time,
    flatness,
    latency_windows,
    p99_ms,
    records_in,
    rss_summary,
    window_cores,
    window_seconds,
)
from workers.devtools.soak.readings import log_lines, row_counts, table_stats
from workers.devtools.soak.report import show
from workers.devtools.soak.session import Soak
from workers.kafka import ensure_topics
from workers.settings import Settings

console = Console(stderr=True)

CAPACITY_EVENTS = 100_000
# The default rate, as a share of the capacity measured first: low enough that the
# pipeline has room to catch up after each crash (the bench's README, "The soak", says why
# a larger share leaves none).
RATE_SHARE = 0.25


def soak_settings(settings: Settings, env: dict[str, str] | None, run: str) -> Settings:
    """``settings`` with topics and a consumer group of the run's own; with ``env`` (the
    embedded stack's), pointed at its servers (its ``postgres`` database, as the bench's)."""
    update: dict[str, Any] = {
        "topic_charges": f"soak{run}.charges",
        "topic_usage": f"soak{run}.usage",
        "topic_alerts": f"soak{run}.alerts",
        "topic_payouts": f"soak{run}.payouts",
        "topic_dlq": f"soak{run}.dlq",
        "consumer_group": f"soak{run}",
        "log_level": "warning",
        "log_format": "json",
    }
    if env is not None:
        update |= {
            "database_url": SecretStr(
                env["CHARGELINE_DATABASE_URL"].rsplit("/", 1)[0] + "/postgres"
            ),
            "kafka_bootstrap_servers": env["CHARGELINE_KAFKA_BOOTSTRAP_SERVERS"],
            "kafka_idempotent_producer": False,
            "stripe_api_base": env["CHARGELINE_STRIPE_API_BASE"],
            "stripe_api_key": SecretStr(env["CHARGELINE_STRIPE_API_KEY"]),
        }
    return settings.model_copy(update=update)


async def measure_capacity(settings: Settings, workdir: Path, run: str) -> float:
    """Schema, topics and flows; the bench's mixed load of ``CAPACITY_EVENTS`` published and
    drained by one ``worker all`` process (the bench's drain): its events/s. Its grants are
    what the soak's usage eats, and the soak's group goes on from its offsets."""
    await prepare_database(settings)
    await ensure_topics(settings, partitions=PARTITIONS)
    console.print(f"capacity: draining {CAPACITY_EVENTS:,} events with `worker all`...")
    load = build_load(CAPACITY_EVENTS, run=f"{run}-")
    await publish(settings, load)
    worker = WorkerRun(settings, workdir / "capacity.log")
    try:
        return float((await drain(worker, load.total, {}, None))["throughput_eps"])
    finally:
        await asyncio.to_thread(worker.stop)


async def run_soak(
    settings: Settings,
    *,
    minutes: float,
    rate: float | None,
    crash_every_min: float,
    window_min: float | None,
    json_path: Path | None,
) -> dict[str, Any]:
    """The soak on an embedded stack of its own, unless the environment names both servers
    (as the bench); the figures are shown, written to ``json_path`` if given, and returned
    (``ok``: every acceptance check met)."""
    from workers.devtools.devstack import LocalStack

    duration_s, crash_every_s = minutes * 60, crash_every_min * 60
    window_s = window_seconds(crash_every_s, None if window_min is None else window_min * 60)
    workdir = Path(tempfile.mkdtemp(prefix="chargeline-soak-"))
    results: dict[str, Any] = {
        "minutes": minutes,
        "crash_every_min": crash_every_min,
        "window_min": window_s / 60,
        "logs": str(workdir),
    }
    own_stack = not (
        os.environ.get("CHARGELINE_DATABASE_URL")
        and os.environ.get("CHARGELINE_KAFKA_BOOTSTRAP_SERVERS")
    )
    stack = None
    if own_stack:
        console.print("starting the embedded stack (fsync on)...")
        stack = await asyncio.to_thread(LocalStack.start, fsync=True)
    run = uuid.uuid4().hex[:6]
    settings = soak_settings(settings, None if stack is None else stack.env(), run)
    results["servers"] = "embedded" if stack is not None else "from the environment"
    soak: Soak | None = None
    python_loop = python_loop_seconds()
    try:
        results["capacity_eps"] = await measure_capacity(settings, workdir, run)
        results["rate_eps"] = rate if rate is not None else results["capacity_eps"] * RATE_SHARE
        soak = Soak(
            settings,
            workdir,
            rate=results["rate_eps"],
            duration_s=duration_s,
            crash_every_s=crash_every_s,
            window_s=window_s,
            customers=customer_count(CAPACITY_EVENTS),
            run=run,
            servers={} if stack is None else server_pids(stack),
        )
        conn = await asyncpg.connect(settings.dsn)
        try:
            results["tables_start"] = await table_stats(conn)
            console.print(
                f"the soak: {minutes:g} min at {results['rate_eps']:,.0f} events/s "
                f"(capacity {results['capacity_eps']:,.0f}), ingest SIGKILLed every "
                f"{crash_every_min:g} min, logs in {workdir}"
            )
            await soak.start()
            await asyncio.gather(soak.send(), soak.sampler(conn), soak.schedule(), soak.verifier())
            console.print("the end: applying and publishing the rest, then verify...")
            results.update(await soak.finish(conn))
            results["tables_end"] = await table_stats(conn)
            results["counts"] = await row_counts(conn)
        finally:
            await conn.close()
    finally:
        if soak is not None:
            soak.ingest.kill_quietly()
            soak.relay.kill_quietly()
        if stack is not None:
            await asyncio.to_thread(stack.stop)
    assert soak is not None
    results.update(summarize(soak, duration_s, window_s))
    results["machine"] = {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "python_loop_s": python_loop,
    }
    await conclude(results, json_path)
    return results


async def conclude(results: dict[str, Any], json_path: Path | None) -> None:
    """The acceptance checks, the tables, and the JSON."""
    checks = acceptance(results)
    results["acceptance"] = [check.as_dict() for check in checks]
    results["ok"] = all(check.met for check in checks)
    show(results)
    if json_path is not None:
        document = orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
        await asyncio.to_thread(json_path.write_bytes, document)
        console.print(f"wrote {json_path}")


def summarize(soak: Soak, duration_s: float, window_s: float) -> dict[str, Any]:
    """The figures of what ``soak`` recorded."""
    early_s = early_time(duration_s, window_s)
    windows = latency_windows(soak.intervals, window_s, duration_s)
    for row, cores in zip(windows, window_cores(soak.cpu, window_s, duration_s), strict=True):
        row["cores"] = cores
    flat = flatness(windows)
    ingest = soak.ingest.incarnations
    for crash in soak.crashes:
        incarnation = ingest[crash["incarnation"] - 1]
        for key, reached in (
            ("consuming_s", incarnation.consuming_s),
            ("recovery_s", incarnation.caught_up_s),
        ):
            crash[key] = math.nan if reached is None else reached - incarnation.started_s
    backlog = soak.outbox_backlog
    return {
        "records_sent": soak.sent["records"],
        "rate_sent_eps": soak.sent["records"] / soak.sent["seconds"] if soak.sent["seconds"] else 0,
        "first_catch_up_s": (
            ingest[0].caught_up_s if ingest and ingest[0].caught_up_s is not None else math.nan
        ),
        "crashes": soak.crashes,
        "relay_restart": soak.relay_restart,
        "processes": {
            role.name: {
                "kinds": list(role.kinds),
                "incarnations": [i.as_dict() for i in role.incarnations],
            }
            for role in (soak.ingest, soak.relay)
        },
        "rss_mib": {
            role.name: rss_summary(role.rss, early_s, duration_s, lookback_s=window_s)
            for role in (soak.ingest, soak.relay)
        },
        "rss_samples": {
            role.name: [[s.at_s, s.incarnation, round(s.mib, 1), s.steady] for s in role.rss]
            for role in (soak.ingest, soak.relay)
        },
        "latency_intervals": [
            [i.end_s, records_in(i.buckets), p99_ms(i.buckets), i.steady] for i in soak.intervals
        ],
        "broker_rss_mib": {
            "start": soak.broker_rss[0][1] if soak.broker_rss else math.nan,
            "end": soak.broker_rss[-1][1] if soak.broker_rss else math.nan,
        },
        "latency_windows": windows,
        "latency_flatness": {
            "flat": flat.flat,
            "largest_ms": flat.largest_ms,
            "median_ms": flat.median_ms,
            "windows": flat.windows,
            "note": flat.note,
        },
        "outbox_max_unpublished": max((rows for _, rows, _ in backlog), default=0),
        "outbox_max_oldest_age_s": max((age for _, _, age in backlog), default=0.0),
        "verify": soak.verify,
        "unexpected_exits": soak.ingest.unexpected + soak.relay.unexpected,
        "log_lines": {role.name: log_lines(role.log) for role in (soak.ingest, soak.relay)},
    }
