"""What each ``chargeline`` command does. Parsing lives in ``main``; rendering in ``output``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from workers import db
from workers.app import WORKER_KINDS, WorkerProcess
from workers.cli.output import emit_object, emit_rows, to_json
from workers.errors import NotFoundError, UsageError, require_local_extra
from workers.kafka import ensure_topics
from workers.publish import publish_file
from workers.settings import Settings

__all__ = ["WORKER_KINDS"]


async def _connect(settings: Settings) -> asyncpg.Connection:
    conn: asyncpg.Connection = await asyncpg.connect(settings.dsn, timeout=10)
    return conn


async def _fetch(settings: Settings, query: str, *params: Any) -> list[dict[str, Any]]:
    conn = await _connect(settings)
    try:
        return [dict(row.items()) for row in await conn.fetch(db.QUERIES[query], *params)]
    finally:
        await conn.close()


async def migrate(settings: Settings, args: argparse.Namespace) -> int:
    applied = await db.migrate(settings.dsn)
    print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))
    return 0


async def topics_ensure(settings: Settings, args: argparse.Namespace) -> int:
    created = await ensure_topics(settings, args.partitions, args.replication_factor)
    print(f"created {len(created)} topic(s)" + (f": {', '.join(created)}" if created else ""))
    return 0


async def worker(settings: Settings, args: argparse.Namespace) -> int:
    await WorkerProcess(settings, tuple(args.kinds)).run()
    return 0


async def bench(settings: Settings, args: argparse.Namespace) -> int:
    require_local_extra("bench")
    from workers.bench import run_bench  # the harness is only imported when asked for

    await run_bench(
        settings,
        events=args.events,
        json_path=args.json,
        fixed_rate_s=args.fixed_rate_seconds,
        naive_s=args.naive_seconds,
        profile_dir=args.profile,
    )
    return 0


async def dev(settings: Settings, args: argparse.Namespace) -> int:
    require_local_extra("dev")
    from workers.dev import run_dev  # the embedded stack is only imported when asked for

    return await run_dev(settings, keep_running=args.keep_running)


FLOW_COLUMNS = [
    "flow_id",
    "name",
    "payee_ref",
    "status",
    "last_charge_at",
    "charge_count",
    "amounts",
]


def _flow_row(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    if isinstance(row.get("amounts"), str):
        row["amounts"] = orjson.loads(row["amounts"])
    return row


async def flows_create(settings: Settings, args: argparse.Namespace) -> int:
    conn = await _connect(settings)
    try:
        created = await conn.fetchval(
            db.QUERIES["flow_create"], args.flow_id, args.name, args.payee
        )
        if created is None:
            raise UsageError(f"flow {args.flow_id!r} already exists")
        row = await conn.fetchrow(db.QUERIES["flow_list"], args.flow_id)
    finally:
        await conn.close()
    emit_object(_flow_row(dict(row.items())), args.format, title="flow created")
    return 0


async def flows_list(settings: Settings, args: argparse.Namespace) -> int:
    rows = [_flow_row(r) for r in await _fetch(settings, "flow_list", None)]
    emit_rows(rows, args.format, columns=FLOW_COLUMNS, title="flows")
    return 0


async def flows_set_status(settings: Settings, args: argparse.Namespace) -> int:
    status = "paused" if args.status == "pause" else "active"
    conn = await _connect(settings)
    try:
        if await conn.fetchval(db.QUERIES["flow_set_status"], args.flow_id, status) is None:
            raise NotFoundError(f"no flow {args.flow_id!r}")
        row = await conn.fetchrow(db.QUERIES["flow_list"], args.flow_id)
    finally:
        await conn.close()
    emit_object(_flow_row(dict(row.items())), args.format, title=f"flow {status}")
    return 0


CHARGE_COLUMNS = [
    "flow_id",
    "customer_ref",
    "reference",
    "amount",
    "currency",
    "status",
    "metadata",
    "occurred_at",
    "recorded_at",
]


def _charge_row(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    if row.get("metadata") is not None:
        row["metadata"] = orjson.loads(row["metadata"])
    return row


async def charges_list(settings: Settings, args: argparse.Namespace) -> int:
    if args.since and args.until and args.since >= args.until:
        raise UsageError("--since must be before --until")
    rows = await _fetch(
        settings,
        "charge_list",
        args.flow,
        args.customer,
        args.status,
        args.since,
        args.until,
        args.limit,
    )
    emit_rows([_charge_row(r) for r in rows], args.format, columns=CHARGE_COLUMNS, title="charges")
    return 0


async def charges_show(settings: Settings, args: argparse.Namespace) -> int:
    charge_id = int(args.charge) if args.charge.isdigit() and args.flow is None else None
    rows = await _fetch(settings, "charge_show", charge_id, args.flow, args.charge)
    if charge_id is not None and not rows:
        rows = await _fetch(settings, "charge_show", None, None, args.charge)
    if not rows:
        raise NotFoundError(f"no charge {args.charge!r}")
    if len(rows) > 1:
        raise UsageError(f"reference {args.charge!r} is used in several flows: add --flow")
    emit_object(_charge_row(rows[0]), args.format, title="charge")
    return 0


async def publish(settings: Settings, args: argparse.Namespace) -> int:
    report = await publish_file(settings, args.topic, Path(args.file))
    emit_object(
        {
            "topic": report.topic,
            "file": report.file,
            "published": report.published,
            "by_type": report.by_type,
        },
        args.format,
        title="published",
    )
    return 0


async def verify(settings: Settings, args: argparse.Namespace) -> int:
    from workers.verify import verify as run_checks

    conn = await _connect(settings)
    try:
        report = await run_checks(conn, limit=args.limit)
    finally:
        await conn.close()
    if args.format == "json":
        sys.stdout.write(to_json(report.as_dict()) + "\n")
    else:
        for violation in report.violations:
            print(
                f"invariant {violation.invariant} ({violation.check}): {violation.description}"
                f" ({len(violation.rows)} row(s) shown)"
            )
            for row in violation.rows:
                print("  " + orjson.dumps(row, default=str).decode())
        verdict = "ok" if report.ok else f"{len(report.violations)} check(s) failed"
        print(f"verify: {verdict} ({report.checks} checks in {report.seconds:.2f}s)")
    return 0 if report.ok else 1
