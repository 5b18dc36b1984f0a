"""The soak's figures as tables on the terminal (standard output; progress goes to standard
error, as the bench's): the run, latency per window, the processes' memory, the tables,
and the acceptance checks, each met or missed."""

from __future__ import annotations

import math
import statistics
from typing import Any

from rich.console import Console
from rich.table import Table

from workers.devtools.bench.report import latency_bar


def _n(value: float, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _run_table(results: dict[str, Any]) -> Table:
    table = Table(
        title=f"chargeline soak: {results['minutes']:g} min, ingest SIGKILLed every "
        f"{results['crash_every_min']:g} min"
    )
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("note")
    verify = results["verify"]
    relay = results["relay_restart"]
    outbox = results["outbox_end"]
    counts = results["counts"]
    rows = [
        ("capacity (events/s)", _n(results["capacity_eps"]), "100,000-event drain, worker all"),
        ("rate asked / sent (events/s)",
         f"{_n(results['rate_eps'])} / {_n(results['rate_sent_eps'])}",
         f"{results['records_sent']:,} records"),
        ("crashes: consuming, caught up (s)",
         "; ".join(f"{_n(c['consuming_s'], 1)}, {_n(c['recovery_s'], 1)}"
                   for c in results["crashes"]) or "none",
         "from the SIGKILL: first record applied; < 2 s of load behind"),
        ("relay restart: exit code, down (s)",
         f"{relay.get('exit_code', '-')}, {_n(relay.get('down_s', math.nan), 1)}",
         f"SIGTERM at {_n(relay.get('at_min', math.nan), 1)} min, to the new one ready"),
        *(
            (f"verify ({label}): wall / checks (s)",
             f"{_n(v['wall_s'], 2)} / {_n(v['checks_s'], 2)}",
             f"at {v['at_min']:.1f} min, {'ok' if v['ok'] else 'FAILED'},"
             f" {v.get('entries', 0):,} new ledger entries"
             + (" (under load)" if label == "start" else " (load stopped, applied)"))
            for label in ("start", "end")
            if (v := verify.get(label))
        ),
        ("outbox at the end: rows / unpublished",
         f"{outbox['total']:,} / {outbox['unpublished']:,}", "as the load stopped"),
        ("  oldest unpublished (s)", _n(outbox["oldest_unpublished_age_s"], 1), ""),
        ("  most unpublished, oldest (s), in the run",
         f"{results['outbox_max_unpublished']:,}, {_n(results['outbox_max_oldest_age_s'], 1)}",
         "every 10 s"),
        ("applied, published after the load (s)",
         f"{_n(results['end_apply_s'], 1)}, {_n(results['end_publish_s'], 1)}", ""),
        ("alerts, dead letters", f"{counts['alerts']:,}, {counts['dead_letters']:,}", "rows"),
        ("broker RSS start / end (MiB)",
         f"{_n(results['broker_rss_mib']['start'])} / {_n(results['broker_rss_mib']['end'])}",
         "Tansu keeps every record in memory"),
        ("Python loop (s), machine speed", _n(results["machine"]["python_loop_s"], 3),
         "as the bench's"),
    ]  # fmt: skip
    for row in rows:
        table.add_row(*row)
    return table


def _latency_table(results: dict[str, Any]) -> Table:
    table = Table(title="end-to-end latency per window (record sent to database commit)")
    for name in (
        "window (min)",
        "records",
        "p99 ms",
        "steady records",
        "steady p50 / p99 ms",
        "cores: worker / Postgres / broker / soak",
        "machine busy",
    ):
        table.add_column(name, justify="right")
    for w in results["latency_windows"]:
        cores = w.get("cores", {})
        table.add_row(
            f"{w['from_min']:g}-{w['to_min']:g}",
            _n(w["records"]),
            _n(w["p99_ms"]),
            _n(w["steady_records"]),
            f"{_n(w['steady_p50_ms'])} / {_n(w['steady_p99_ms'])}",
            " / ".join(
                _n(cores.get(name, math.nan), 2)
                for name in ("worker", "postgres", "broker", "load_generator")
            ),
            f"{_n(cores.get('machine_busy_pct', math.nan))}%",
        )
    return table


def _rss_table(results: dict[str, Any]) -> Table:
    table = Table(title="worker RSS (MiB), sampled every 10 s; a level is a 1-minute median")
    table.add_column("process")
    for name in ("start", "early", "max", "end", "end vs early", "processes"):
        table.add_column(name, justify="right")
    for role, rss in results["rss_mib"].items():
        incarnations = len(results["processes"][role]["incarnations"])
        table.add_row(
            f"{role} ({' '.join(results['processes'][role]['kinds'])})",
            _n(rss["start"], 1),
            f"{_n(rss['early'], 1)} (#{rss.get('early_incarnation', '-')}, "
            f"{rss.get('early_at_min', math.nan):g} min)",
            _n(rss["max"], 1),
            f"{_n(rss['end'], 1)} (#{rss.get('end_incarnation', '-')})",
            f"{growth:+.1f}%" if math.isfinite(growth := rss.get("growth_pct", math.nan)) else "-",
            str(incarnations),
        )
    return table


def _tables_table(results: dict[str, Any]) -> Table:
    table = Table(title="tables: size with indexes, indexes (MiB), rows, dead rows; start -> end")
    for name in ("table", "size", "indexes", "live rows", "dead rows", "autovacuums"):
        table.add_column(name, justify="right" if name != "table" else "left")
    start, end = results["tables_start"], results["tables_end"]
    for name in sorted(end):
        s, e = start.get(name, {}), end[name]

        def pair(
            key: str, digits: int = 0, s: dict[str, float] = s, e: dict[str, float] = e
        ) -> str:
            return f"{_n(s.get(key, math.nan), digits)} -> {_n(e[key], digits)}"

        table.add_row(
            name,
            pair("total_mib", 1),
            pair("index_mib", 1),
            pair("live_rows"),
            pair("dead_rows"),
            pair("autovacuums"),
        )
    return table


def minutes(results: dict[str, Any]) -> list[dict[str, float]]:
    """Per minute of the load: the median of its 10-s readings' steady p99 (a reading taken
    while the worker caught up after a crash is left out; NaN when all were), and the
    median resident set of each process's samples."""
    rows = []
    for minute in range(math.ceil(results["minutes"])):

        def within(at_s: float, m: int = minute) -> bool:
            return 60 * m < at_s <= 60 * (m + 1)

        p99s = [
            p99 for at_s, records, p99, steady in results["latency_intervals"]
            if within(at_s) and steady and records and math.isfinite(p99)
        ]  # fmt: skip
        row = {"minute": minute + 1, "p99_ms": statistics.median(p99s) if p99s else math.nan}
        for role, samples in results["rss_samples"].items():
            mib = [sample[2] for sample in samples if within(sample[0])]
            row[f"{role}_rss_mib"] = statistics.median(mib) if mib else math.nan
        rows.append(row)
    return rows


def _chart(results: dict[str, Any]) -> Table:
    rows = minutes(results)
    roles = list(results["rss_samples"])
    top = max(
        (row[f"{role}_rss_mib"] for row in rows for role in roles
         if math.isfinite(row[f"{role}_rss_mib"])),
        default=math.nan,
    )  # fmt: skip
    table = Table(title="per minute: steady p99 (median of 10-s readings) and RSS (median)")
    table.add_column("min", justify="right")
    table.add_column("p99 ms", justify="right")
    table.add_column("p99, log scale: 10 ms .. 10 s")
    for role in roles:
        table.add_column(f"{role} MiB", justify="right")
    table.add_column(f"{roles[0]} RSS, 0 .. {_n(top)} MiB" if roles else "")
    for row in rows:
        first = row[f"{roles[0]}_rss_mib"] if roles else math.nan
        filled = round(20 * first / top) if math.isfinite(first) and top > 0 else 0
        table.add_row(
            str(row["minute"]),
            _n(row["p99_ms"]),
            latency_bar(row["p99_ms"]),
            *(_n(row[f"{role}_rss_mib"], 1) for role in roles),
            "#" * filled + "." * (20 - filled),
        )
    return table


def _acceptance_table(results: dict[str, Any]) -> Table:
    table = Table(title="acceptance")
    table.add_column("check")
    table.add_column("value")
    table.add_column("rule")
    table.add_column("", justify="center")
    for check in results["acceptance"]:
        verdict = "[green]met[/green]" if check["met"] else "[red]missed[/red]"
        table.add_row(check["check"], check["value"], check["rule"], verdict)
    return table


def show(results: dict[str, Any]) -> None:
    out = Console()
    for table in (
        _run_table(results),
        _latency_table(results),
        _rss_table(results),
        _chart(results),
        _tables_table(results),
        _acceptance_table(results),
    ):
        out.print(table)
    for role, levels in results["log_lines"].items():
        for level, events in levels.items():
            shown = ", ".join(f"{event} x{count}" for event, count in list(events.items())[:6])
            out.print(f"{role} log, {level}: {shown}")
    if not results["ok"]:
        out.print(f"[red]soak: checks missed[/red] (worker logs in {results['logs']})")
