"""``chargeline api`` (the HTTP API until SIGTERM) and ``chargeline api-keys
create|list|revoke`` (a new key is printed once; Postgres keeps only its digest)."""

from __future__ import annotations

import argparse
import asyncio

from workers import db
from workers.api import keys
from workers.cli.args import Parser, add_actions, add_format, add_noun, positive_int
from workers.cli.database import connect, fetch_rows
from workers.cli.output import emit_object, emit_rows
from workers.errors import NotFoundError, UsageError
from workers.settings import Settings

KEY_COLUMNS = ["id", "name", "prefix", "scopes", "created_at", "last_used_at", "revoked_at"]


def add_api(nouns: argparse._SubParsersAction[Parser]) -> None:
    add_noun(nouns, "api").set_defaults(run=api_command, loop_factory=_uvloop)


def add_api_keys(nouns: argparse._SubParsersAction[Parser]) -> None:
    actions = add_actions(nouns, "api-keys")
    create = actions.add_parser("create", help="a new key, printed once")
    create.add_argument("name", metavar="NAME")
    create.add_argument(
        "--scope",
        action="append",
        required=True,
        choices=keys.SCOPES,
        dest="scopes",
        help="what the key may do (repeatable): " + ", ".join(keys.SCOPES),
    )
    add_format(create, csv=False)
    create.set_defaults(run=keys_create)
    listing = actions.add_parser("list", help="keys: name, prefix, scopes, created, last used")
    add_format(listing)
    listing.set_defaults(run=keys_list)
    revoke = actions.add_parser("revoke", help="revoke a key: it is refused from now on")
    revoke.add_argument("key_id", type=positive_int, metavar="ID")
    add_format(revoke, csv=False)
    revoke.set_defaults(run=keys_revoke)


def _uvloop() -> asyncio.AbstractEventLoop:
    """libuv's event loop: a server's loop spends less per request than asyncio's own."""
    import uvloop

    return uvloop.new_event_loop()


async def api_command(settings: Settings, args: argparse.Namespace) -> int:
    from workers.api.server import run_api

    return await run_api(settings)


async def keys_create(settings: Settings, args: argparse.Namespace) -> int:
    name = args.name.strip()
    if not 1 <= len(name) <= 200:
        raise UsageError("the name should be 1-200 characters")
    new = keys.new_key()
    conn = await connect(settings)
    try:
        row = await db.fetch_one(
            conn,
            db.QUERIES["api_key_create"],
            name,
            new.prefix,
            new.lookup,
            new.digest,
            sorted(set(args.scopes)),
        )
    finally:
        await conn.close()
    created = {
        "id": row["key_id"],
        "name": row["name"],
        "prefix": row["prefix"],
        "scopes": list(row["scopes"]),
        "created_at": row["created_at"],
        "key": new.key,
    }
    emit_object(created, args.format, title="API key created (the key is shown only now)")
    return 0


async def keys_list(settings: Settings, args: argparse.Namespace) -> int:
    rows = await fetch_rows(settings, "api_key_list")
    emit_rows(rows, args.format, columns=KEY_COLUMNS, title="API keys")
    return 0


async def keys_revoke(settings: Settings, args: argparse.Namespace) -> int:
    rows = await fetch_rows(settings, "api_key_revoke", args.key_id)
    if not rows:
        raise NotFoundError(f"no API key {args.key_id}")
    # An API process trusts a key it has checked for keys.CACHE_S: once this returns,
    # every one of them has looked again and refuses it.
    await asyncio.sleep(keys.CACHE_S)
    emit_object(rows[0], args.format, title="API key revoked")
    return 0
