"""``chargeline flows create|list|pause|resume|update``: flows group charges and name the
payee they are paid out to."""

from __future__ import annotations

import argparse
from typing import Any

import orjson

from workers import db
from workers.cli.args import Parser, add_actions, add_format, identifier
from workers.cli.database import connect, fetch_rows
from workers.cli.output import emit_object, emit_rows
from workers.errors import NotFoundError, UsageError
from workers.settings import Settings

FLOW_COLUMNS = [
    "flow_id",
    "name",
    "payee_ref",
    "status",
    "last_charge_at",
    "charge_count",
    "amounts",
]


def add_flows(nouns: argparse._SubParsersAction[Parser]) -> None:
    flows = add_actions(nouns, "flows")
    create = flows.add_parser("create", help="create a flow")
    create.add_argument("flow_id", type=identifier, metavar="ID")
    create.add_argument("--name", required=True)
    create.add_argument("--payee", type=identifier, default="default")
    add_format(create)
    create.set_defaults(run=flows_create)
    listing = flows.add_parser("list", help="flows with status, last charge time and counts")
    add_format(listing)
    listing.set_defaults(run=flows_list)
    for action in ("pause", "resume"):
        sub = flows.add_parser(action, help=f"{action} a flow")
        sub.add_argument("flow_id", type=identifier, metavar="ID")
        add_format(sub)
        sub.set_defaults(run=flows_set_status, status=action)
    update = flows.add_parser("update", help="rename a flow, change payee")
    update.add_argument("flow_id", type=identifier, metavar="ID")
    update.add_argument("--name")
    update.add_argument("--payee", type=identifier, help="also for its charges not yet paid out")
    add_format(update)
    update.set_defaults(run=flows_update)


def _flow_row(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    if isinstance(row.get("amounts"), str):
        row["amounts"] = orjson.loads(row["amounts"])
    return row


async def flows_create(settings: Settings, args: argparse.Namespace) -> int:
    conn = await connect(settings)
    try:
        created = await conn.fetchval(
            db.QUERIES["flow_create"], args.flow_id, args.name, args.payee
        )
        if created is None:
            raise UsageError(f"flow {args.flow_id!r} already exists")
        row = await db.fetch_one(conn, db.QUERIES["flow_list"], args.flow_id)
    finally:
        await conn.close()
    emit_object(_flow_row(dict(row.items())), args.format, title="flow created")
    return 0


async def flows_list(settings: Settings, args: argparse.Namespace) -> int:
    rows = [_flow_row(r) for r in await fetch_rows(settings, "flow_list", None)]
    emit_rows(rows, args.format, columns=FLOW_COLUMNS, title="flows")
    return 0


async def flows_set_status(settings: Settings, args: argparse.Namespace) -> int:
    status = "paused" if args.status == "pause" else "active"
    conn = await connect(settings)
    try:
        if await conn.fetchval(db.QUERIES["flow_set_status"], args.flow_id, status) is None:
            raise NotFoundError(f"no flow {args.flow_id!r}")
        row = await db.fetch_one(conn, db.QUERIES["flow_list"], args.flow_id)
    finally:
        await conn.close()
    emit_object(_flow_row(dict(row.items())), args.format, title=f"flow {status}")
    return 0


async def flows_update(settings: Settings, args: argparse.Namespace) -> int:
    if args.name is None and args.payee is None:
        raise UsageError("flows update: nothing to change (give --name and/or --payee)")
    conn = await connect(settings)
    try:
        if (
            await conn.fetchval(db.QUERIES["flow_update"], args.flow_id, args.name, args.payee)
            is None
        ):
            raise NotFoundError(f"no flow {args.flow_id!r}")
        row = await db.fetch_one(conn, db.QUERIES["flow_list"], args.flow_id)
    finally:
        await conn.close()
    emit_object(_flow_row(dict(row.items())), args.format, title="flow updated")
    return 0
