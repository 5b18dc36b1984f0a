"""Fixtures for the whole suite: real servers, a fresh migrated database per test.

Servers come from, in order of preference: environment variables naming existing ones
(``CHARGELINE_TEST_DATABASE_URL`` + ``CHARGELINE_TEST_KAFKA_BOOTSTRAP_SERVERS``, optionally
``CHARGELINE_TEST_STRIPE_API_BASE``), testcontainers when a local Docker engine answers, or
the embedded stack of :mod:`workers.devtools.devstack`. Nothing starts until a test asks for
``stack`` (directly or through ``database_url``/``settings``), so unit tests need no server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from pydantic import SecretStr

from tests.support import Stack, Topics, url_with_database
from workers.devtools.devstack import STRIPE_TEST_KEY, LocalStack, LocalStripe
from workers.settings import Settings

_TESTS_DIR = Path(__file__).parent
_MARKED_DIRS = {"integration": pytest.mark.integration, "faults": pytest.mark.faults}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by directory, so ``-m "not faults"`` works without per-file markers."""
    for item in items:
        with contextlib.suppress(ValueError):  # items outside tests/ (none today)
            top = item.path.relative_to(_TESTS_DIR).parts[0]
            if top in _MARKED_DIRS:
                item.add_marker(_MARKED_DIRS[top])


def _docker_answers() -> bool:
    """True when a local Docker engine answers within 2 s (the CLI alone is not enough)."""
    if shutil.which("docker") is None:
        return False
    host = os.environ.get("DOCKER_HOST", "")
    if host and not host.startswith("unix://"):
        return False  # a remote engine would put the servers outside 127.0.0.0/8
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, timeout=2, check=False)
    except subprocess.TimeoutExpired:
        return False
    return info.returncode == 0


def _env_stack(exits: contextlib.ExitStack) -> Stack | None:
    database_url = os.environ.get("CHARGELINE_TEST_DATABASE_URL")
    servers = os.environ.get("CHARGELINE_TEST_KAFKA_BOOTSTRAP_SERVERS")
    if not (database_url and servers):
        return None
    idempotent = os.environ.get("CHARGELINE_TEST_KAFKA_IDEMPOTENT_PRODUCER", "false")
    return Stack(
        database_url=database_url,
        bootstrap_servers=servers,
        stripe_api_base=os.environ.get("CHARGELINE_TEST_STRIPE_API_BASE") or _local_stripe(exits),
        kafka_idempotent_producer=idempotent.lower() in {"1", "true", "yes"},
    )


def _local_stripe(exits: contextlib.ExitStack) -> str:
    """A localstripe of our own (it needs no Docker), for stacks that have none."""
    base_dir = Path(tempfile.mkdtemp(prefix="chargeline-stripe-"))
    exits.callback(shutil.rmtree, base_dir, ignore_errors=True)
    stripe = LocalStripe.start(base_dir)
    exits.callback(stripe.stop)
    return stripe.api_base


def _container_stack(exits: contextlib.ExitStack) -> Stack:  # pragma: no cover -- needs Docker
    from testcontainers.community.kafka import KafkaContainer
    from testcontainers.community.postgres import PostgresContainer

    postgres = exits.enter_context(
        PostgresContainer("postgres:16-alpine", username="postgres", driver=None)
    )
    kafka = exits.enter_context(KafkaContainer("confluentinc/cp-kafka:7.6.0").with_kraft())
    return Stack(
        database_url=postgres.get_connection_url(),
        bootstrap_servers=kafka.get_bootstrap_server(),
        stripe_api_base=_local_stripe(exits),
        kafka_idempotent_producer=True,  # real Apache Kafka
    )


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """Servers for the session: existing ones, testcontainers, or the embedded stack."""
    with contextlib.ExitStack() as exits:
        found = _env_stack(exits)
        if found is None and _docker_answers():
            found = _container_stack(exits)  # pragma: no cover
        if found is None:
            local = LocalStack.start()
            exits.callback(local.stop)
            found = Stack(
                database_url=local.postgres.url,
                bootstrap_servers=local.broker.bootstrap_servers,
                stripe_api_base=local.stripe.api_base,
                kafka_idempotent_producer=False,
                local=local,
            )
        yield found


async def _admin(stack: Stack, statement: str) -> None:
    """Run one statement on the server-level database.

    A connection per statement, never one kept open: fault tests restart Postgres.
    """
    conn = await asyncpg.connect(stack.database_url)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def template_database(stack: Stack) -> AsyncIterator[str]:
    """Name of a migrated database that each test's database is copied from.

    Unique per session, so that two runs against the same server cannot collide.
    """
    from workers.db import migrate  # here, not at the top: unit tests must not need it

    name = f"chargeline_template_{uuid.uuid4().hex[:8]}"
    await _admin(stack, f'CREATE DATABASE "{name}"')
    try:
        await migrate(url_with_database(stack.database_url, name))
        # No connections from now on: CREATE DATABASE ... TEMPLATE fails while any exist.
        await _admin(stack, f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        yield name
    finally:
        await _admin(stack, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def database_url(stack: Stack, template_database: str) -> AsyncIterator[str]:
    """URL of a fresh, migrated database of this test's own; dropped afterwards."""
    name = f"test_{uuid.uuid4().hex}"
    await _admin(stack, f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    yield url_with_database(stack.database_url, name)
    await _admin(stack, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def topics() -> Topics:
    """Fresh topic names for this test, e.g. ``t1a2b3c4d.billing.charges``."""
    return Topics(prefix=f"t{uuid.uuid4().hex[:8]}.")


@pytest.fixture
def settings(stack: Stack, database_url: str, topics: Topics) -> Settings:
    """Settings of a worker pointed at this test's database, topics and consumer group."""
    return Settings(
        database_url=SecretStr(database_url),
        kafka_bootstrap_servers=stack.bootstrap_servers,
        kafka_idempotent_producer=stack.kafka_idempotent_producer,
        topic_charges=topics.charges,
        topic_usage=topics.usage,
        topic_alerts=topics.alerts,
        topic_payouts=topics.payouts,
        topic_dlq=topics.dlq,
        consumer_group=f"{topics.prefix}chargeline",
        stripe_api_key=SecretStr(STRIPE_TEST_KEY),
        stripe_api_base=stack.stripe_api_base,
        metrics_port=0,
        log_format="console",
        batch_max_wait_ms=50,
        kafka_session_timeout_ms=6000,
    )
