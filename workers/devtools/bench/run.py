"""``chargeline bench``: throughput, limits and latency on this machine, in one run.

Every figure is measured in the same run on the same servers, so the ratios (throughput
against raw COPY, against the naive per-event consumer) mean something on a shared, noisy
machine. Before the phases, a fixed Python loop times the machine's speed; then, in order:

1. publish a mixed load (80% usage across customers that hold grants, 20% charges across
   20 flows, 5% exact duplicates, 0.1% malformed), built before any clock starts;
2. raw consume: read it all with no processing (the broker's limit);
3. drain: one ``chargeline worker all`` process applies the whole load (throughput, CPU
   seconds per 1,000 events of the worker and of Postgres, peak RSS);
4. raw COPY of the same rows into tables with the same unique indexes (Postgres's limit);
5. naive: the same worker with batches of one event, so one transaction and one offset
   commit per event (the baseline the target ratio names); and, for reference, a floor
   under it: two bare statements per event;
6. replay: a new consumer group re-reads everything (all duplicates);
7. the whole machine: a second load of the same size (new references), on a database and
   topics of its own, drained by ``chargeline worker --processes N`` with N the machine's
   CPUs (``machine_throughput_eps``); then, on the same processes, the same mix at a fixed
   rate of 10%, 25%, 50% and 75% of that throughput, with depletions of fresh customers
   threaded through: end-to-end latency (record append to database commit, from the
   workers' histograms) and alert latency (depleting record's append to the alert's append
   on billing.alerts) at each, and the CPU the load generator itself used
   (``latency_curve``; the 50% point is ``latency_p99_ms``);
8. the HTTP API: charges published straight to Kafka by the bench's producer (the
   baseline), then through a ``chargeline api`` process, one a request and 500 a request;
   and the latency of one charge at half the API's single-charge capacity, answered at once
   and with ``Prefer: wait``, a charges worker applying them.

The load is in ``load.py``, the phases in ``phases.py`` and ``http.py``, the worker process
in ``worker.py``, CPU and histograms in ``measure.py``, the tables in ``report.py`` and
``--profile`` in ``profile.py``; this module only runs them in order.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import orjson
from pydantic import SecretStr
from rich.console import Console

from workers.devtools.bench.http import http_api
from workers.devtools.bench.load import (
    PARTITIONS,
    SEND_TICK_S,
    build_load,
    customer_count,
    publish,
)
from workers.devtools.bench.measure import python_loop_seconds, server_pids
from workers.devtools.bench.phases import (
    CURVE_LOADS_PCT,
    drain,
    machine,
    naive_pipeline,
    naive_sql,
    prepare_database,
    raw_consume,
    raw_copy,
    replay,
)
from workers.devtools.bench.profile import DrainProfile
from workers.devtools.bench.report import show, show_profile
from workers.devtools.bench.worker import WorkerRun
from workers.kafka import ensure_topics
from workers.settings import Settings

console = Console(stderr=True)

PHASE_LIMIT_S = 180.0  # no phase may hang the whole run
HALF_PCT = 50  # the curve's point that is the headline latency


async def run_bench(  # noqa: PLR0915 -- the phases in order, as the docstring lists them
    settings: Settings,
    *,
    events: int,
    json_path: Path | None,
    fixed_rate_s: float = 20.0,
    send_tick_s: float | None = None,
    naive_s: float = 10.0,
    profile_dir: Path | None = None,
    api_s: float | None = None,
) -> dict[str, Any]:
    """Every phase, in order, on an embedded stack of its own unless the environment names
    both servers; the figures are shown, written to ``json_path`` if given, and returned.
    Each step of the HTTP phase lasts ``api_s`` seconds (by default ``fixed_rate_s``, at
    most 5); the latency curve sends every ``send_tick_s`` (by default ``SEND_TICK_S``)."""
    api_s = min(5.0, fixed_rate_s) if api_s is None else api_s
    send_tick_s = SEND_TICK_S if send_tick_s is None else send_tick_s
    # Imported when run, so that importing the bench's modules (as the tests do) does not
    # load the embedded servers' packages.
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
    servers = {} if stack is None else server_pids(stack)
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
            results.update(await drain(worker, load.total, servers, profile))
        finally:
            worker.stop()
        results["cpu_us_per_event"] = (
            results["cpu_s_per_1k_events"] + results.get("postgres_cpu_s_per_1k_events", 0.0)
        ) * 1000

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
        results["replay_eps"] = await replay(
            settings.model_copy(update={"consumer_group": f"bench{run}-replay"}),
            workdir / "replay.log",
            load.total,
        )

        processes = os.cpu_count() or 1
        console.print(
            f"the whole machine: {processes} worker processes, a new load, then the latency "
            f"curve at {', '.join(map(str, CURVE_LOADS_PCT))}% of their throughput..."
        )
        results.update(
            await machine(
                settings, workdir, build_load(events, run=f"{run}-m-"), processes=processes,
                fixed_rate_s=fixed_rate_s, send_tick_s=send_tick_s, run=f"{run}-m-",
                customers=customer_count(events), servers=servers,
            )
        )  # fmt: skip
        half = next(p for p in results["latency_curve"] if p["load_pct"] == HALF_PCT)
        results.update(
            latency_p50_ms=half["p50_ms"],
            latency_p99_ms=half["p99_ms"],
            alert_latency_p99_ms=half["alert_p99_ms"],
            alerts_measured=half["alerts_measured"],
            fixed_rate_eps=half["rate_eps"],
            fixed_rate_machine_busy_pct=half["machine_busy_pct"],
            fixed_rate_cpu_cores=half["cores"],
        )

        console.print("the HTTP API, beside the direct producer...")
        results.update(
            await asyncio.wait_for(
                http_api(settings, workdir, api_s, run=f"{run}-", customers=customer_count(events)),
                PHASE_LIMIT_S,
            )
        )
        if results["api_failed_requests"]:
            console.print(
                f"[red]{results['api_failed_requests']} API requests failed (see "
                f"{workdir / 'api.log'})[/red]"
            )
    finally:
        if stack is not None:
            await asyncio.to_thread(stack.stop)
    results["ratio_throughput_to_raw_copy"] = results["throughput_eps"] / results["raw_copy_eps"]
    results["ratio_throughput_to_naive"] = results["throughput_eps"] / results["naive_eps"]
    results["ratio_machine_to_raw_copy"] = (
        results["machine_throughput_eps"] / results["raw_copy_eps"]
    )
    results["ratio_throughput_to_raw_consume"] = (
        results["throughput_eps"] / results["raw_consume_eps"]
    )
    results["ratio_api_batch_to_direct_publish"] = (
        results["api_batch_eps"] / results["direct_publish_eps"]
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
