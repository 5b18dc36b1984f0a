"""The one Postgres connection a command uses, and its rows as dicts."""

from __future__ import annotations

from typing import Any

import asyncpg

from workers import db
from workers.settings import Settings


async def connect(settings: Settings) -> asyncpg.Connection:
    conn: asyncpg.Connection = await asyncpg.connect(settings.dsn, timeout=10)
    return conn


async def fetch_rows(settings: Settings, query: str, *params: Any) -> list[dict[str, Any]]:
    """The rows of the named query, on a connection of its own."""
    conn = await connect(settings)
    try:
        return [dict(row.items()) for row in await conn.fetch(db.QUERIES[query], *params)]
    finally:
        await conn.close()
