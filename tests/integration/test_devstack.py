"""The servers the suite runs against answer real clients over real connections."""

from __future__ import annotations

import urllib.request
import uuid
from pathlib import Path

import asyncpg
import pytest
import stripe
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from tests.support import Stack, Topics, settings_env
from workers.devtools.devstack import STRIPE_TEST_KEY, LocalPostgres
from workers.settings import Settings


async def test_postgres_answers(stack: Stack) -> None:
    conn = await asyncpg.connect(stack.database_url)
    try:
        assert await conn.fetchval("select 1") == 1
    finally:
        await conn.close()


async def test_broker_roundtrip(stack: Stack) -> None:
    topic = f"t{uuid.uuid4().hex[:8]}.devstack"
    producer = AIOKafkaProducer(
        bootstrap_servers=stack.bootstrap_servers, acks="all", enable_idempotence=False
    )
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"hello", key=b"cus_1", headers=[("h", b"v")])
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=stack.bootstrap_servers,
        group_id=f"{topic}.group",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        # Tansu completes a group join after about half the session timeout (5 s by default).
        session_timeout_ms=2000,
        heartbeat_interval_ms=500,
    )
    await consumer.start()
    try:
        record = await consumer.getone()
    finally:
        await consumer.stop()
    assert (record.key, record.value, list(record.headers)) == (b"cus_1", b"hello", [("h", b"v")])


def test_stripe_stand_in_creates_customers(stack: Stack) -> None:
    client = stripe.StripeClient(STRIPE_TEST_KEY, base_addresses={"api": stack.stripe_api_base})
    created = client.v1.customers.create(params={"email": "devstack@example.com"})
    assert created.id.startswith("cus_")
    assert client.v1.customers.retrieve(created.id).email == "devstack@example.com"


async def test_postgres_restart_keeps_data(tmp_path: Path) -> None:
    postgres = LocalPostgres.start(tmp_path)
    try:
        conn = await asyncpg.connect(postgres.url)
        await conn.execute("create table kept (v int); insert into kept values (42)")
        await conn.close()
        port, pid = postgres.port, postgres.pid
        postgres.restart()
        assert postgres.port == port
        assert postgres.pid not in (None, pid)
        conn = await asyncpg.connect(postgres.url)
        try:
            assert await conn.fetchval("select v from kept") == 42
        finally:
            await conn.close()
    finally:
        postgres.stop()
        postgres.stop()  # idempotent
    assert postgres.pid is None


def test_paused_stripe_stand_in_stops_answering(stack: Stack) -> None:
    if stack.local is None:
        pytest.skip("only the embedded stack can be paused")
    customers = f"{stack.stripe_api_base}/v1/customers"
    request = urllib.request.Request(customers, headers={"Authorization": "Bearer sk_test_x"})
    stack.local.stripe.pause()
    try:
        with pytest.raises(TimeoutError):
            urllib.request.urlopen(request, timeout=0.5)
    finally:
        stack.local.stripe.resume()
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200


async def test_database_url_is_fresh_and_migrated(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        versions = await conn.fetch("select version from schema_migrations")
        assert versions, "the template was migrated"
        assert await conn.fetchval("select current_database()") != "postgres"
    finally:
        await conn.close()


def test_settings_env_round_trips(settings: Settings, topics: Topics) -> None:
    env = settings_env(settings)
    assert env["CHARGELINE_TOPIC_DLQ"] == topics.dlq == f"{topics.prefix}billing.dlq"
    assert env["CHARGELINE_DATABASE_URL"].startswith("postgresql://")  # unmasked
    assert (
        Settings.model_validate(
            {name.removeprefix("CHARGELINE_").lower(): value for name, value in env.items()}
        )
        == settings
    )
