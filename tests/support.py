"""Helpers for tests that drive real servers: produce, consume, run workers, wait."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import orjson
import stripe
import uvicorn
from aiokafka import AIOKafkaConsumer, TopicPartition
from multidict import CIMultiDict

from workers import db
from workers.api.app import create_app
from workers.app import WorkerProcess
from workers.devtools.devstack import LocalStack
from workers.kafka import client_options, ensure_topics, make_producer
from workers.settings import Settings

Event = dict[str, Any]
DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


@dataclass
class Stack:
    """The servers one test session talks to."""

    database_url: str  # server level, superuser: may create and drop databases
    bootstrap_servers: str
    stripe_api_base: str
    kafka_idempotent_producer: bool  # off for Tansu, which lacks InitProducerId
    local: LocalStack | None = None  # set when embedded: fault tests stop/pause its servers


@dataclass(frozen=True)
class Topics:
    """Topic names unique to one test (a prefix), so tests never see each other's records."""

    prefix: str

    @property
    def charges(self) -> str:
        return f"{self.prefix}billing.charges"

    @property
    def usage(self) -> str:
        return f"{self.prefix}billing.usage"

    @property
    def alerts(self) -> str:
        return f"{self.prefix}billing.alerts"

    @property
    def payouts(self) -> str:
        return f"{self.prefix}billing.payouts"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}billing.dlq"

    @property
    def all(self) -> tuple[str, ...]:
        return (self.charges, self.usage, self.alerts, self.payouts, self.dlq)


def url_with_database(url: str, database: str) -> str:
    """``url`` with its database (the path) replaced, keeping credentials and options."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


def healthcheck_command() -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text()
    match = re.search(r"^\s+CMD (\[.*\])$", text.split("HEALTHCHECK", 1)[1], re.M)
    assert match is not None
    command: list[str] = json.loads(match.group(1))
    return command


def charge(flow: str, customer: str, reference: str, amount: int = 100, **extra: Any) -> Event:
    return {
        "type": "charge",
        "flow_id": flow,
        "customer_ref": customer,
        "reference": reference,
        "amount": amount,
        "currency": extra.pop("currency", "EUR"),
        **extra,
    }


def record(event: Event | bytes, key: str | bytes | None = None) -> tuple[bytes | None, bytes]:
    """(key, value) of a Kafka record; the key defaults to the event's customer_ref."""
    if isinstance(event, bytes):
        value = event
    else:
        value = orjson.dumps(event)
        if key is None:
            key = event.get("customer_ref")
    return (key.encode() if isinstance(key, str) else key), value


async def produce(
    settings: Settings, topic: str, records: Iterable[tuple[bytes | None, bytes]]
) -> int:
    producer = make_producer(settings, client_id="test-producer")
    await producer.start()
    try:
        futures = [await producer.send(topic, value=v, key=k) for k, v in records]
        await asyncio.gather(*futures)
        return len(futures)
    finally:
        await producer.stop()


async def setup_pipeline(
    settings: Settings, *, partitions: int = 3, flows: Iterable[tuple[str, str]] = ()
) -> None:
    """Topics with ``partitions`` partitions, and flows as (flow_id, status)."""
    await ensure_topics(settings, partitions=partitions)
    conn = await asyncpg.connect(settings.dsn)
    try:
        for flow_id, status in flows:
            await conn.execute(db.QUERIES["flow_create"], flow_id, flow_id, "default")
            await conn.execute(db.QUERIES["flow_set_status"], flow_id, status)
    finally:
        await conn.close()


async def wait_for(
    condition: Callable[[], Awaitable[bool]], *, timeout: float = 60, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def fetchval(settings: Settings, query: str, *args: Any) -> Any:
    conn = await asyncpg.connect(settings.dsn)
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()


async def fetch(settings: Settings, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(settings.dsn)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, *kinds: str) -> AsyncIterator[WorkerProcess]:
    """A worker process's parts running in this event loop; stopped (drained) on exit."""
    process = WorkerProcess(settings, kinds or ("all",))
    task = asyncio.create_task(process.run(install_signal_handlers=False))
    try:
        yield process
    finally:
        process.stop()
        await asyncio.wait_for(task, timeout=60)


# The session timeout of workers a test kills and replaces: the group moves a killed member's
# partitions once its session has expired, and each kill would otherwise wait the default.
KILLED_MEMBER_SESSION_MS = 2500


def spawn_worker(
    env: dict[str, str], *kinds: str, log_path: str | None = None
) -> subprocess.Popen[bytes]:
    """A real worker OS process (`chargeline worker`), for kill and restart tests."""
    command = [sys.executable, "-m", "workers.cli.main", "worker", *(kinds or ("all",))]
    if log_path is None:
        return subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL)
    # The child keeps its own copy of the descriptor; ours is closed at once.
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            command, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT
        )


async def consume_all(
    settings: Settings, topic: str, *, expected: int, timeout: float = 30
) -> list[Any]:
    """Read ``topic`` from the beginning until ``expected`` records (or the timeout)."""
    consumer = AIOKafkaConsumer(
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **client_options(settings),
    )
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        deadline = time.monotonic() + timeout
        while len(records) < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for tp_records in batch.values():
                records.extend(tp_records)
        return records
    finally:
        await consumer.stop()


def usage(customer: str, reference: str, tokens: int, **extra: Any) -> Event:
    return {
        "type": "usage",
        "customer_ref": customer,
        "reference": reference,
        "tokens": tokens,
        **extra,
    }


def grant(
    customer: str, reference: str, tokens: int, *, cost_basis: str = "0.0001", **extra: Any
) -> Event:
    return {
        "type": "credit_grant",
        "customer_ref": customer,
        "reference": reference,
        "tokens": tokens,
        "cost_basis": cost_basis,
        "currency": extra.pop("currency", "USD"),
        "source": extra.pop("source", "purchase"),
        **extra,
    }


def rfc3339(moment: Any) -> str:
    return str(moment.isoformat().replace("+00:00", "Z"))


async def alerts_on_topic(settings: Settings, *, expected: int, timeout: float = 30) -> list[Event]:
    """The alerts on billing.alerts, decoded, in publication order per customer."""
    messages = await consume_all(
        settings, settings.topic_alerts, expected=expected, timeout=timeout
    )
    messages.sort(key=lambda m: (m.partition, m.offset))
    return [orjson.loads(m.value) for m in messages]


async def ingest_done(process: WorkerProcess, records: int) -> bool:
    return process.ingest is not None and process.ingest.totals.records >= records


async def outbox_empty(settings: Settings) -> bool:
    return bool(
        await fetchval(settings, "SELECT count(*) = 0 FROM outbox WHERE published_at IS NULL")
    )


async def assert_invariants(settings: Settings) -> None:
    """`chargeline verify`'s checks pass on this test's database: on all history (`--full`),
    and since the checkpoint (which, on a database not verified before, is all history too:
    the two sets of queries are held to the same verdict)."""
    from workers.jobs.verify import verify, verify_recent

    conn, fence = await asyncpg.connect(settings.dsn), await asyncpg.connect(settings.dsn)
    try:
        for report in (await verify(conn), await verify_recent(conn, fence)):
            assert report.ok, orjson.dumps(report.as_dict(), default=str).decode()
    finally:
        await conn.close()
        await fence.close()


# --- payouts ---


async def create_flows(settings: Settings, flows: Iterable[tuple[str, str]]) -> None:
    """Active flows as (flow_id, payee_ref)."""
    conn = await asyncpg.connect(settings.dsn)
    try:
        for flow_id, payee in flows:
            await conn.execute(db.QUERIES["flow_create"], flow_id, flow_id, payee)
    finally:
        await conn.close()


async def insert_charges(
    conn: asyncpg.Connection,
    flow: str,
    count: int,
    *,
    currency: str = "EUR",
    recorded_at: Any = None,
    prefix: str = "r",
) -> int:
    """``count`` charges straight into Postgres (bypassing Kafka: faster, and ``recorded_at``
    can be set in the past); amounts vary. Returns their total."""
    total: int = await conn.fetchval(
        """WITH new AS (
               INSERT INTO charges (flow_id, reference, customer_ref, amount, currency,
                                    occurred_at, recorded_at, fingerprint, payload,
                                    source_topic, source_partition, source_offset)
               SELECT $1, $2 || '-' || g, 'cust_' || (g % 17), 100 + (g % 7) * 25, $3,
                      coalesce($4, now()), coalesce($4, now()), '\\x00', '{}', 'test', 0, g
               FROM generate_series(1, $5::int) g
               RETURNING amount)
           SELECT coalesce(sum(amount), 0)::bigint FROM new""",
        flow,
        f"{prefix}-{flow}-{currency}",
        currency,
        recorded_at,
        count,
    )
    return total


async def payout_violations(settings: Settings) -> list[dict[str, Any]]:
    """Rows breaking invariant 3 (SPEC.md section 9, `chargeline verify`'s payouts check): a
    payout whose count or total differs from its charges, a charge in no real payout."""
    conn = await asyncpg.connect(settings.dsn)
    try:
        return [dict(row.items()) for row in await conn.fetch(db.QUERIES["verify_payouts"], 100)]
    finally:
        await conn.close()


def settings_env(settings: Settings) -> dict[str, str]:
    """``settings`` as CHARGELINE_* variables (secrets in clear) for a worker subprocess."""
    return settings.as_env()


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """The `chargeline` command line as a subprocess, configured by ``settings``."""
    return subprocess.run(
        [sys.executable, "-m", "workers.cli.main", *args],
        env={**os.environ, **settings_env(settings)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ok_json(settings: Settings, *args: str) -> Any:
    """The JSON a successful command printed with ``--format json``."""
    done = cli(settings, *args, "--format", "json")
    assert done.returncode == 0, done.stderr
    return orjson.loads(done.stdout)


def assert_one_line_error(
    done: subprocess.CompletedProcess[str], *, code: int, mentions: str
) -> None:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert mentions in lines[0]


# --- replay ---


async def log_end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    """The exact end of each partition of ``topic`` (fetch highwater, not ListOffsets)."""
    from workers.ops.topic_ranges import log_ends, topic_partitions

    consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **client_options(settings))
    await consumer.start()
    try:
        partitions = await topic_partitions(consumer, topic)
        consumer.assign(partitions)
        ends = await log_ends(consumer, partitions)
        return {tp.partition: end for tp, end in ends.items()}
    finally:
        await consumer.stop()


async def group_offsets(settings: Settings, topic: str) -> dict[int, int | None]:
    """The live consumer group's committed offsets on ``topic`` (None: nothing committed)."""
    from workers.ops.topic_ranges import topic_partitions

    consumer = AIOKafkaConsumer(
        group_id=settings.consumer_group, enable_auto_commit=False, **client_options(settings)
    )
    await consumer.start()
    try:
        partitions = await topic_partitions(consumer, topic)
        return {tp.partition: await consumer.committed(tp) for tp in partitions}
    finally:
        await consumer.stop()


async def move_group_to_end(settings: Settings, *topics: str) -> dict[TopicPartition, int]:
    """Commit the log end of every partition for the live group (its workers stopped): what
    an operator's offset reset past unprocessed records does. Joins the group as a member
    (Tansu refuses commits from outside the group)."""
    from workers.ops.topic_ranges import log_ends

    consumer = AIOKafkaConsumer(
        *topics,
        group_id=settings.consumer_group,
        enable_auto_commit=False,
        session_timeout_ms=6000,
        **client_options(settings),
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + 30
        while not consumer.assignment():
            assert time.monotonic() < deadline, "never got the partitions"
            await consumer.getmany(timeout_ms=200)
        ends = await log_ends(consumer, sorted(consumer.assignment()))
        await consumer.commit(ends)
        return ends
    finally:
        await consumer.stop()


STATE_QUERIES = {
    "charges": "SELECT count(*) || '/' || coalesce(sum(amount), 0) FROM charges",
    "usage_events": "SELECT count(*)::text FROM usage_events",
    "grants": "SELECT count(*) || '/' || coalesce(sum(remaining), 0) FROM grants",
    "ledger_entries": "SELECT count(*)::text FROM ledger_entries",
    "balances": "SELECT coalesce(string_agg(customer_ref || '=' || balance, ',' "
    "ORDER BY customer_ref), '') FROM customers",
    "alerts": "SELECT count(*)::text FROM alerts",
    "dead_letters": "SELECT count(*)::text FROM dead_letters",
    "conflicts": "SELECT count(*)::text FROM conflicts",
    "outbox": "SELECT count(*)::text FROM outbox",
}


async def database_state(settings: Settings) -> dict[str, str]:
    """A fingerprint of what the apply path writes: equal fingerprints, nothing changed."""
    conn = await asyncpg.connect(settings.dsn)
    try:
        return {name: await conn.fetchval(query) for name, query in STATE_QUERIES.items()}
    finally:
        await conn.close()


# --- the HTTP API ---


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def api_server(settings: Settings) -> AsyncIterator[str]:
    """``chargeline api``'s application under uvicorn, on a free loopback port."""
    port = free_port()
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_config=None, access_log=False
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:

        async def ready() -> bool:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{base}/readyz") as response:
                    return response.status == 200
            return False

        await wait_for(ready, timeout=30, what="the API ready")
    try:
        yield base
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=30)


def new_key(settings: Settings, *scopes: str) -> dict[str, Any]:
    args = [arg for scope in scopes for arg in ("--scope", scope)]
    done = cli(settings, "api-keys", "create", "test", *args, "--format", "json")
    assert done.returncode == 0, done.stderr
    created: dict[str, Any] = orjson.loads(done.stdout)
    assert created["key"].startswith("cl_live_") and len(created["key"]) >= 40
    return created


async def call(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    key: str | None = None,
    body: Any = None,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], CIMultiDict[str]]:
    sent = dict(headers or {})
    if key is not None:
        sent.setdefault("Authorization", f"Bearer {key}")
    if body is not None:
        data = orjson.dumps(body)
        sent.setdefault("Content-Type", "application/json")
    payload = None if data is None else io.BytesIO(data)
    async with session.request(method, url, data=payload, headers=sent) as response:
        document = orjson.loads(await response.read())
        assert response.headers.get("X-Request-Id"), "every answer carries X-Request-Id"
        return response.status, document, CIMultiDict(response.headers)


# --- the Stripe stand-in ---


@contextlib.asynccontextmanager
async def stripe_client(settings: Settings) -> AsyncIterator[stripe.StripeClient]:
    http = stripe.AIOHTTPClient()
    try:
        yield stripe.StripeClient(
            settings.stripe_api_key.get_secret_value(),
            base_addresses={"api": settings.stripe_api_base},
            http_client=http,
        )
    finally:
        await http.close_async()  # type: ignore[no-untyped-call]  # untyped in the SDK


async def stripe_customer(settings: Settings, card: str) -> str:
    """A Stripe customer at the stand-in whose default payment method is ``card``."""
    async with stripe_client(settings) as client:
        customer = await client.v1.customers.create_async({"email": "buyer@example.com"})
        method = await client.v1.payment_methods.create_async(
            {
                "type": "card",
                "card": {"number": card, "exp_month": 12, "exp_year": 2031, "cvc": "123"},
            }
        )
        await client.v1.payment_methods.attach_async(method.id, {"customer": customer.id})
        await client.v1.customers.update_async(
            customer.id, {"invoice_settings": {"default_payment_method": method.id}}
        )
        return str(customer.id)


async def intents_of(settings: Settings, stripe_customer_id: str) -> list[Any]:
    async with stripe_client(settings) as client:
        page = await client.v1.payment_intents.list_async({"limit": 100})
        return [
            i for i in page.data if i.customer == stripe_customer_id
        ]  # the stand-in can't filter
