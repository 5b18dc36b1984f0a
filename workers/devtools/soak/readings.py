"""What the soak reads besides the workers' metrics: Postgres's tables and outbox,
``chargeline verify`` as an operator runs it, and the workers' logs."""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from workers.settings import Settings

TABLES = (
    "charges", "usage_events", "ledger_entries", "grants", "customers", "outbox", "alerts",
    "dead_letters",
)  # fmt: skip
TABLE_STATS = """
SELECT relname AS table, pg_total_relation_size(relid) AS total_bytes,
       pg_indexes_size(relid) AS index_bytes, n_live_tup AS live_rows, n_dead_tup AS dead_rows,
       autovacuum_count AS autovacuums, autoanalyze_count AS autoanalyzes
FROM pg_stat_user_tables WHERE schemaname = current_schema() AND relname = ANY($1::text[])
ORDER BY relname
"""
OUTBOX_BACKLOG = """
SELECT count(*) AS unpublished,
       coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)::float8 AS age_s
FROM outbox WHERE published_at IS NULL
"""


async def outbox_backlog(conn: asyncpg.Connection) -> tuple[int, float]:
    """Unpublished outbox rows, and the age in seconds of the oldest (0 with none)."""
    row = await conn.fetchrow(OUTBOX_BACKLOG)
    assert row is not None
    return int(row["unpublished"]), float(row["age_s"])


async def table_stats(conn: asyncpg.Connection) -> dict[str, dict[str, float]]:
    """Size (table, TOAST and indexes), indexes, live and dead rows, autovacuum and
    autoanalyze runs so far, of each of the main tables, as Postgres's statistics say."""
    rows = await conn.fetch(TABLE_STATS, list(TABLES))
    return {
        row["table"]: {
            "total_mib": row["total_bytes"] / (1 << 20),
            "index_mib": row["index_bytes"] / (1 << 20),
            "live_rows": float(row["live_rows"]),
            "dead_rows": float(row["dead_rows"]),
            "autovacuums": float(row["autovacuums"]),
            "autoanalyzes": float(row["autoanalyzes"]),
        }
        for row in rows
    }


async def row_counts(conn: asyncpg.Connection) -> dict[str, int]:
    """Alerts and dead letters recorded: that the load raised both."""
    row = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM alerts) AS alerts, "
        "(SELECT count(*) FROM dead_letters) AS dead_letters"
    )
    assert row is not None
    return {"alerts": int(row["alerts"]), "dead_letters": int(row["dead_letters"])}


def log_lines(log: Path) -> dict[str, dict[str, int]]:
    """The worker log's lines at warning and above, counted by level and event."""
    counts: dict[str, Counter[str]] = {}
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return {}
    for line in text.splitlines():
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            entry = {"level": "other", "event": line[:80]}
        if not isinstance(entry, dict):
            continue
        level = str(entry.get("level", ""))
        if level in ("warning", "error", "critical", "other"):
            counts.setdefault(level, Counter())[str(entry.get("event", ""))] += 1
    return {level: dict(counter.most_common()) for level, counter in counts.items()}


async def verify_once(settings: Settings) -> dict[str, Any]:
    """``chargeline verify --format json`` as an operator runs it: its wall time, the time
    its checks took by its own account, and its verdict."""
    env = {**os.environ, **settings.as_env()}
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "workers.cli.main", "verify", "--format", "json",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    wall_s = time.monotonic() - started
    try:
        report = json.loads(out)
    except ValueError:
        report = {"ok": False, "violations": [], "error": err.decode()[-2000:]}
    return {
        "wall_s": wall_s,
        "checks_s": report.get("seconds", math.nan),
        "checks": report.get("checks", 0),
        # What it covered: the ledger entries after the last passing run's checkpoint.
        "entries": (report.get("scope") or {}).get("entries", 0),
        "step_seconds": report.get("step_seconds", {}),
        "ok": bool(report.get("ok")) and process.returncode == 0,
        "exit_code": process.returncode,
        "violations": report.get("violations", []),
        **({"error": report["error"]} if "error" in report else {}),
    }
