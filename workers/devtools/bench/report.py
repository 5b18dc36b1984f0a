"""The bench's figures as tables on the terminal: the results beside their targets, and
with ``--profile`` where the drain's time went.

The tables go to standard output and the progress messages to standard error, so that the
figures can be kept apart from the bench's account of what it is doing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _half_capacity_rows(results: dict[str, Any]) -> list[tuple[str, float, str]]:
    """What the machine did during the fixed-rate load: the latency figures' context."""
    if "fixed_rate_cpu_cores" not in results:
        return []  # the phase timed out
    cores = results["fixed_rate_cpu_cores"]
    return [
        ("  rate sent (events/s)", results["fixed_rate_eps"], "half the machine's throughput"),
        ("  machine CPU busy (%)", results["fixed_rate_machine_busy_pct"], "while it was sent"),
        *(
            (f"  {name.replace('_', ' ')} (cores)", cores[name], "while it was sent")
            for name in ("worker", "postgres", "broker", "load_generator")
            if name in cores
        ),
    ]


def _http_rows(results: dict[str, Any]) -> list[tuple[str, float, str]]:
    """The HTTP path beside the direct producer, and its latency at half its capacity."""
    rate = f"at {results['api_latency_rate_rps']:,.0f} requests/s, half capacity"
    return [
        ("direct publish (events/s)", results["direct_publish_eps"], "bench producer, charges"),
        ("API, single charges (requests/s)", results["api_single_rps"], "64 in flight"),
        ("API, batches of 500 (events/s)", results["api_batch_eps"], "POST /v1/events"),
        (
            "API batches / direct publish",
            results["ratio_api_batch_to_direct_publish"],
            "same run, same broker",
        ),
        ("API latency p99 (ms), 202", results["api_latency_p99_ms"], rate),
        (
            "  the same, a worker applying them",
            results["api_latency_applying_p99_ms"],
            "the cores shared with the worker and Postgres",
        ),
        ("API latency p99 (ms), Prefer: wait=5", results["api_wait_latency_p99_ms"], rate),
        *(
            [("  API requests failed", results["api_failed_requests"], "not in the figures")]
            if results["api_failed_requests"]
            else []
        ),
    ]


def show(results: dict[str, Any]) -> None:
    """Every figure of the run, with its target or what it is measured against."""
    table = Table(title=f"chargeline bench: {results['events']:,} events")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target / note")
    processes = results["machine_processes"]
    rows = [
        ("throughput (events/s, one worker)", results["throughput_eps"], "one process"),
        (
            f"machine throughput (events/s, {processes} worker processes)",
            results["machine_throughput_eps"],
            ">= 30,000",
        ),
        ("machine throughput / raw COPY", results["ratio_machine_to_raw_copy"], ">= 0.40"),
        ("CPU us per event (worker + Postgres)", results["cpu_us_per_event"], "<= 50"),
        ("peak RSS per process (MiB), machine", results["machine_peak_rss_mib"], "< 256"),
        ("raw consume (records/s)", results["raw_consume_eps"], "broker limit"),
        ("raw COPY (rows/s)", results["raw_copy_eps"], "Postgres limit"),
        ("naive (events/s)", results["naive_eps"], "same worker, one event per transaction"),
        ("naive, SQL only (events/s)", results["naive_sql_eps"], "2 statements per event"),
        ("throughput / raw COPY", results["ratio_throughput_to_raw_copy"], "one process"),
        ("throughput / naive", results["ratio_throughput_to_naive"], ">= 50"),
        ("latency p50 (ms) at half capacity", results["latency_p50_ms"], "the machine's"),
        ("latency p99 (ms) at half capacity", results["latency_p99_ms"], "< 500"),
        ("alert latency p99 (ms) at half capacity", results["alert_latency_p99_ms"], "< 1,000"),
        *_half_capacity_rows(results),
        ("replay, all duplicates (events/s)", results["replay_eps"], ">= 60,000"),
        *_http_rows(results),
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
    show_curve(results["latency_curve"])


def show_curve(curve: list[dict[str, Any]]) -> None:
    """The latency curve as a table with a bar per point (p99, on a log scale up to 10 s):
    end-to-end and alert latency against the load, and the generator's own CPU."""
    table = Table(title="latency against load (the whole machine)")
    for name in ("load", "events/s", "p50 ms", "p99 ms", "alert p99 ms", "generator cores"):
        table.add_column(name, justify="right")
    table.add_column("p99, log scale: 10 ms .. 10 s")
    for point in curve:
        table.add_row(
            f"{point['load_pct']}%",
            f"{point['rate_eps']:,.0f}",
            f"{point['p50_ms']:,.0f}",
            f"{point['p99_ms']:,.0f}",
            f"{point['alert_p99_ms']:,.0f}",
            f"{point['generator_cores']:.2f}",
            latency_bar(point["p99_ms"]),
        )
    Console().print(table)


def latency_bar(ms: float, width: int = 20) -> str:
    """A bar whose length is ``ms`` on a log scale from 10 ms (empty) to 10 s (full)."""
    if not math.isfinite(ms) or ms <= 0:
        return "?"
    filled = round(width * min(1.0, max(0.0, math.log10(ms / 10) / 3)))
    return "#" * filled + "." * (width - filled)


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
    if profile.get("autovacuum"):
        out.print(_autovacuum_table(profile["autovacuum"], "Postgres during the drain: autovacuum"))
    for note in profile.get("notes", []):
        out.print(f"[yellow]profile: {note}[/yellow]")
    if out_dir is not None:
        out.print(
            f"profile in {out_dir}: worker.folded (collapsed stacks, for speedscope or "
            "flamegraph.pl); the figures above are in the JSON under 'profile'. A profiled "
            "run's figures carry the profilers' cost."
        )


def _autovacuum_table(maintenance: list[dict[str, Any]], title: str) -> Table:
    """What autovacuum did per table: its workers' time is spent outside every statement,
    so the statements' table does not show it."""
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
