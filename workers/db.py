"""Postgres access: the connection pool, named queries from ``.sql`` files, migrations,
and the classification of errors into transient (back off, retry) and permanent."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import asyncpg

MIGRATIONS_PACKAGE = "schemas"
MIGRATIONS_DIR = "sql/migrations"
QUERIES_DIR = Path(__file__).parent / "sql"
_QUERY_HEADER = re.compile(r"^--\s*name:\s*(?P<name>[a-z_][a-z0-9_]*)\s*$", re.MULTILINE)
# Any constant works; it only has to be the same in every process that migrates.
_MIGRATION_LOCK_ID = 0x63686172  # "char"

# SQLSTATE classes after which the same transaction can simply be tried again:
# 08 connection exception, 40 transaction rollback (serialization, deadlock),
# 53 insufficient resources, 57 operator intervention (admin shutdown, cannot connect now).
_TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "57"})
# SQLSTATE classes that say the database is not the one this code expects, whatever the
# rows: 28 authorization, 3D/3F no such database or schema, 42 no such table or column or no
# privilege (not migrated, wrong role), 55 object not in prerequisite state, 58 system error,
# F0 configuration, HV foreign data, XX internal error. No record is to blame, so none is
# dead-lettered: the work waits and is retried until an operator acts.
_ENVIRONMENT_SQLSTATE_CLASSES = frozenset({"28", "3D", "3F", "42", "55", "58", "F0", "HV", "XX"})


# --- the I/O edge, typed ------------------------------------------------------------------
# asyncpg ships no type information, so its objects are Any to mypy. These Protocols name
# what chargeline calls on them, so that every call is checked where bugs cost most.


class Row(Protocol):
    """A result row (``asyncpg.Record``): by column name or position."""

    def __getitem__(self, key: str | int, /) -> Any: ...
    def get(self, key: str, default: Any = None, /) -> Any: ...
    def items(self) -> Iterable[tuple[str, Any]]: ...


class Transaction(Protocol):
    async def __aenter__(self) -> Any: ...
    async def __aexit__(self, *exc: object) -> Any: ...
    async def start(self) -> None: ...
    async def commit(self) -> None: ...
    async def rollback(self) -> None: ...


class Connection(Protocol):
    """What chargeline calls on an ``asyncpg.Connection`` (its own ``timeout`` parameters,
    mirrored as they are)."""

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str: ...
    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Row]: ...
    async def fetchrow(
        self, query: str, *args: Any, timeout: float | None = None
    ) -> Row | None: ...
    async def fetchval(
        self, query: str, *args: Any, column: int = 0, timeout: float | None = None
    ) -> Any: ...
    async def copy_records_to_table(
        self,
        table_name: str,
        *,
        records: Iterable[Sequence[Any]],
        columns: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> str: ...
    def transaction(
        self, *, isolation: str | None = None, readonly: bool = False, deferrable: bool = False
    ) -> Transaction: ...
    def is_closed(self) -> bool: ...
    async def close(self, *, timeout: float | None = None) -> None: ...


class Pool(Protocol):
    """What chargeline calls on an ``asyncpg.Pool``."""

    def acquire(
        self, *, timeout: float | None = None
    ) -> AbstractAsyncContextManager[Connection]: ...
    async def close(self) -> None: ...


async def fetch_one(conn: Connection, query: str, *args: Any) -> Row:
    """The row of a statement that always returns exactly one (an aggregate, a report)."""
    row = await conn.fetchrow(query, *args)
    if row is None:
        raise RuntimeError(f"expected a row from: {query[:80]}")
    return row


def load_queries(directory: Path = QUERIES_DIR) -> dict[str, str]:
    """Every ``-- name: xyz`` block of every ``.sql`` file in ``directory``, by name."""
    queries: dict[str, str] = {}
    for path in sorted(directory.glob("*.sql")):
        text = path.read_text()
        headers = list(_QUERY_HEADER.finditer(text))
        for header, following in zip(headers, [*headers[1:], None], strict=True):
            end = following.start() if following else len(text)
            name = header.group("name")
            if name in queries:
                raise ValueError(f"query {name!r} defined twice (second time in {path.name})")
            queries[name] = text[header.end() : end].strip()
    return queries


QUERIES: Mapping[str, str] = load_queries()


def is_transient(exc: BaseException) -> bool:
    """True for failures of the database *service* (retry later), false for bugs and data."""
    if isinstance(exc, OSError | ConnectionError | asyncio.TimeoutError):
        return True
    if isinstance(exc, asyncpg.InterfaceError | asyncpg.InternalClientError):
        # "connection is closed", "connection was closed in the middle of operation".
        return True
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = getattr(exc, "sqlstate", None) or ""
        return sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES
    return False


def is_environment_fault(exc: BaseException) -> bool:
    """True for permanent failures of the database's setup (see above), not of the data."""
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = getattr(exc, "sqlstate", None) or ""
        return sqlstate[:2] in _ENVIRONMENT_SQLSTATE_CLASSES
    return False


def is_retried(exc: BaseException) -> bool:
    """True when the same work should be tried again later: an outage, or a setup fault an
    operator will fix. Anything else is the fault of the records being applied."""
    return is_transient(exc) or is_environment_fault(exc)


SERVER_SETTINGS = {
    "application_name": "chargeline",
    # The batch statements take arrays of thousands of rows: after five runs Postgres would
    # switch them to a generic plan that guesses the arrays' sizes, far slower for large
    # batches. Plan each execution. Every connection chargeline opens gets it from here; a
    # small part's transaction asks for generic plans (workers.ingest.processor).
    "plan_cache_mode": "force_custom_plan",
}


async def connect(dsn: str) -> Connection:
    """One connection of its own (a command, a dry run), set up as the pool's are."""
    conn: Connection = await asyncpg.connect(dsn, timeout=10, server_settings=SERVER_SETTINGS)
    return conn


async def create_pool(
    dsn: str, *, min_size: int = 1, max_size: int = 4, command_timeout: float = 120
) -> Pool:
    """A pool whose connections fail fast, so an outage shows as an error, not a hang; a
    statement that has not answered in ``command_timeout`` seconds is given up."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        timeout=10,
        command_timeout=command_timeout,
        max_inactive_connection_lifetime=60,
        server_settings=SERVER_SETTINGS,
    )
    assert pool is not None
    typed: Pool = pool
    return typed


def migration_files() -> list[tuple[str, str]]:
    """(version, sql) of every migration, in order."""
    folder = resources.files(MIGRATIONS_PACKAGE).joinpath(MIGRATIONS_DIR)
    files = sorted(
        (entry for entry in folder.iterdir() if entry.name.endswith(".sql")),
        key=lambda entry: entry.name,
    )
    return [(entry.name.removesuffix(".sql"), entry.read_text()) for entry in files]


async def migrate(dsn: str) -> list[str]:
    """Apply the migrations not yet applied, each in its own transaction; return their names.

    Safe to run from several processes at once: an advisory lock serialises them.
    """
    conn: asyncpg.Connection = await asyncpg.connect(dsn)
    applied: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK_ID)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version text PRIMARY KEY,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, sql in migration_files():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            applied.append(version)
    finally:
        await conn.close()
    return applied


def record_to_dict(record: Row) -> dict[str, Any]:
    return dict(record.items())
