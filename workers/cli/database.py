"""The one Postgres connection a command uses, and its rows as dicts."""

from __future__ import annotations

from typing import Any

from workers import db
from workers.settings import Settings


async def connect(settings: Settings) -> db.Connection:
    return await db.connect(settings.dsn)


async def fetch_rows(settings: Settings, query: str, *params: Any) -> list[dict[str, Any]]:
    """The rows of the named query, on a connection of its own."""
    conn = await connect(settings)
    try:
        return [dict(row.items()) for row in await conn.fetch(db.QUERIES[query], *params)]
    finally:
        await conn.close()
