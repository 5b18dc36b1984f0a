"""``chargeline dev`` / ``make run``: the whole pipeline on one machine, with a demo load.

Starts Postgres, a Kafka-protocol broker and the Stripe stand-in locally (or uses the
servers named by CHARGELINE_DATABASE_URL and CHARGELINE_KAFKA_BOOTSTRAP_SERVERS), migrates,
creates topics and flows, runs the workers in this process, publishes a demo load that
exercises every path of a charge, waits until it is all processed, and prints a summary.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
from rich.console import Console
from rich.table import Table

from schemas.currency import minor_unit_exponent
from workers import db
from workers.app import WorkerProcess
from workers.devtools.api_demo import ApiDemo, seed_call, start_api
from workers.devtools.demo_billing import (
    cut_now,
    outbox_drained,
    reloads_succeeded,
    start_auto_reload,
)
from workers.kafka import ensure_topics, make_producer
from workers.logs import configure_logging, get_logger
from workers.settings import Settings, mask_url

log = get_logger("chargeline.dev")
console = Console()

DEMO_FLOWS = [
    ("flow_images", "Image processing", "studio-north", "active"),
    ("flow_reports", "One-off reports", "studio-north", "active"),
    ("flow_api", "Pro workspace usage", "default", "active"),
    ("flow_legacy", "Legacy exports", "default", "paused"),
]


@dataclass
class DemoLoad:
    """The demo records, and what a correct pipeline must make of them."""

    records: list[tuple[bytes | None, bytes]] = field(default_factory=list)  # charges topic
    expected: Counter[str] = field(default_factory=Counter)
    usage: list[tuple[bytes, bytes]] = field(default_factory=list)  # usage topic, in order
    expected_usage: Counter[str] = field(default_factory=Counter)
    expected_alerts: Counter[str] = field(default_factory=Counter)
    expected_balances: dict[str, int] = field(default_factory=dict)
    api: ApiDemo | None = None
    auto_reload_customer: str = ""
    reloads_succeeded: int = 0
    payouts: tuple[int, int] = (0, 0)  # payouts cut, charges they pay out

    @property
    def total(self) -> int:
        return len(self.records) + len(self.usage)


def build_demo_load(seed: int = 7, charges: int = 400) -> DemoLoad:
    rng = random.Random(seed)  # noqa: S311 -- demo data, not secrets
    run = uuid.uuid4().hex[:8]  # fresh references per run: a second `make run` adds new charges
    load = DemoLoad()
    now = datetime.now(UTC)
    currencies = ["EUR", "EUR", "USD", "JPY", "KWD"]
    active = [flow for flow, _, _, status in DEMO_FLOWS if status == "active"]
    unique: list[dict[str, Any]] = []
    for n in range(charges):
        customer = f"user_{rng.randint(1, 40):03d}"
        currency = rng.choice(currencies)
        unique.append(
            {
                "type": "charge",
                "flow_id": rng.choice(active),
                "customer_ref": customer,
                "reference": f"demo-{run}-{n:05d}",
                "amount": rng.randint(1, 5000) * (1 if currency != "JPY" else 10),
                "currency": currency,
                "metadata": {"job_id": str(n), "source": "chargeline-dev"},
                "occurred_at": (now - timedelta(seconds=charges - n))
                .isoformat()
                .replace("+00:00", "Z"),
            }
        )

    def add(event: dict[str, Any] | bytes, outcome: str, key: str | None = None) -> None:
        value = event if isinstance(event, bytes) else orjson.dumps(event)
        if key is None and isinstance(event, dict):
            key = event["customer_ref"]
        load.records.append((key.encode() if key else None, value))
        load.expected[outcome] += 1

    for event in unique:
        add(event, "recorded")
    for event in rng.sample(unique, charges // 10):  # producers retrying: exact duplicates
        add(event, "duplicate")
    conflicting = dict(unique[3], amount=unique[3]["amount"] + 1)  # same reference, new amount
    add(conflicting, "conflict")
    load.expected["reference_conflict"] += 1
    for n in range(2):
        add(
            dict(unique[n], flow_id="flow_legacy", reference=f"demo-{run}-legacy-{n}"),
            "flow_paused",
        )
    add(dict(unique[5], flow_id="flow_missing", reference=f"demo-{run}-missing"), "unknown_flow")
    add(b'{"type": "charge", "amount": 100, ', "invalid_json", key="user_001")
    add(dict(unique[6], reference=f"demo-{run}-float", amount=100.0), "invalid_event")
    rng.shuffle(load.records)
    add_ledger_demo(load, run, now)
    return load


def add_ledger_demo(load: DemoLoad, run: str, now: datetime) -> None:
    """Orb's token guide: a purchase and a sooner-expiring plan allocation, usage that runs
    past zero (depleted), a purchase that pays the overage (recovered); a quieter customer;
    a producer retrying a usage event, and one re-using a reference for other tokens."""

    def at(days: int) -> str:
        return (now + timedelta(days=days)).isoformat().replace("+00:00", "Z")

    ana, ben = f"ana-{run}", f"ben-{run}"
    events: list[tuple[dict[str, Any], str]] = [
        ({"type": "credit_grant", "customer_ref": ana, "reference": "purchase-1",
          "tokens": 100_000, "cost_basis": "0.0001", "currency": "USD", "source": "purchase",
          "expires_at": at(365)}, "recorded"),
        ({"type": "credit_grant", "customer_ref": ana, "reference": "plan-nov",
          "tokens": 20_000, "cost_basis": "0", "currency": "USD", "source": "plan",
          "expires_at": at(8)}, "recorded"),
        ({"type": "credit_grant", "customer_ref": ben, "reference": "promo-1",
          "tokens": 10_000, "cost_basis": "0", "currency": "USD", "source": "promotional"},
         "recorded"),
    ]  # fmt: skip
    for n in range(15):
        events.append(({"type": "usage", "customer_ref": ana, "reference": f"req-{n}",
                        "tokens": 8_008, "feature": "chat"}, "recorded"))  # fmt: skip
    for n in range(3):
        events.append(({"type": "usage", "customer_ref": ben, "reference": f"req-{n}",
                        "tokens": 1_000, "feature": "images"}, "recorded"))  # fmt: skip
    events.append((events[5][0], "duplicate"))
    events.append((dict(events[6][0], tokens=1), "conflict"))
    events.append(({"type": "credit_grant", "customer_ref": ana, "reference": "purchase-2",
                    "tokens": 50_000, "cost_basis": "0.0001", "currency": "USD",
                    "source": "purchase"}, "recorded"))  # fmt: skip
    # cara: auto-reload at 1,000 tokens (demo_billing.RELOAD); 2,000 granted, 1,500 used, so
    # the reloads worker charges her card at the Stripe stand-in and grants 10,000.
    cara = f"cara-{run}"
    load.auto_reload_customer = cara
    events.append(({"type": "credit_grant", "customer_ref": cara, "reference": "starter",
                    "tokens": 2_000, "cost_basis": "0.0001", "currency": "USD",
                    "source": "purchase"}, "recorded"))  # fmt: skip
    events.append(({"type": "usage", "customer_ref": cara, "reference": "req-0",
                    "tokens": 1_500, "feature": "chat"}, "recorded"))  # fmt: skip
    for event, outcome in events:
        load.usage.append((event["customer_ref"].encode(), orjson.dumps(event)))
        load.expected_usage[outcome] += 1
    load.expected["reference_conflict"] += 1
    # ana: 120,000 granted, 120,120 used -> -120 (depleted), +50,000 -> 49,880 (recovered).
    load.expected_balances = {ana: 49_880, ben: 7_000, cara: 2_000 - 1_500 + 10_000}
    load.expected_alerts = Counter(
        {"credit_balance_recovered": 4, "credit_balance_depleted": 1,
         "auto_reload_succeeded": 1}
    )  # fmt: skip


def topic_totals(process: WorkerProcess, topic: str) -> Counter[str]:
    """Outcomes of one topic's events in this process."""
    totals: Counter[str] = Counter()
    if process.ingest is not None:
        for (event_topic, _type, outcome), n in process.ingest.totals.counts.items():
            if event_topic == topic:
                totals[outcome] += n
    return totals


def format_money(minor_units: int, currency: str) -> str:
    """12345 EUR -> "123.45 EUR"; JPY has no minor unit, KWD three."""
    exponent = minor_unit_exponent(currency)
    if exponent == 0:
        return f"{minor_units:,} {currency}"
    major, minor = divmod(minor_units, 10**exponent)
    return f"{major:,}.{minor:0{exponent}d} {currency}"


async def _prepare(settings: Settings) -> None:
    await db.migrate(settings.dsn)
    await ensure_topics(settings)
    conn = await asyncpg.connect(settings.dsn)
    try:
        for flow_id, name, payee, status in DEMO_FLOWS:
            await conn.execute(db.QUERIES["flow_create"], flow_id, name, payee)
            await conn.execute(db.QUERIES["flow_set_status"], flow_id, status)
    finally:
        await conn.close()


async def _publish(settings: Settings, load: DemoLoad) -> None:
    producer = make_producer(settings, client_id="chargeline-dev")
    await producer.start()
    try:
        sends = [
            await producer.send(settings.topic_charges, value=value, key=key)
            for key, value in load.records
        ]
        sends += [
            await producer.send(settings.topic_usage, value=value, key=key)
            for key, value in load.usage
        ]
        await asyncio.gather(*sends)
    finally:
        await producer.stop()


async def _wait_until_processed(
    settings: Settings, process: WorkerProcess, expected: int, deadline_s: float
) -> bool:
    """Until every demo record is applied and every dead letter published on billing.dlq."""
    deadline = time.monotonic() + deadline_s
    conn = await asyncpg.connect(settings.dsn)
    try:
        while time.monotonic() < deadline:
            ingest = process.ingest
            if (
                ingest
                and ingest.totals.records >= expected
                and not await conn.fetchval(
                    "SELECT count(*) FROM outbox WHERE published_at IS NULL"
                )
            ):
                return True
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
    return False


async def _summary(
    settings: Settings, process: WorkerProcess, load: DemoLoad, elapsed: float
) -> bool:
    """Print what happened beside what should have; True when they all match."""
    conn = await asyncpg.connect(settings.dsn)
    try:
        flows = await conn.fetch(db.QUERIES["flow_list"], None)
        reasons = {
            r["reason"]: r["n"]
            for r in await conn.fetch(
                "SELECT reason, count(*) AS n FROM dead_letters GROUP BY reason ORDER BY reason"
            )
        }
        conflicts = await conn.fetchval("SELECT count(*) FROM conflicts")
        unpublished = await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        alerts = Counter(
            {
                r["type"]: r["n"]
                for r in await conn.fetch(
                    "SELECT type, count(*) AS n FROM alerts WHERE customer_ref = ANY($1) "
                    "GROUP BY type",
                    list(load.expected_balances),
                )
            }
        )
        balances = {
            r["customer_ref"]: r["balance"]
            for r in await conn.fetch(
                "SELECT customer_ref, balance FROM customers WHERE customer_ref = ANY($1)",
                list(load.expected_balances),
            )
        }
    finally:
        await conn.close()
    totals = topic_totals(process, settings.topic_charges)
    usage_totals = topic_totals(process, settings.topic_usage)

    table = Table(title="chargeline dev: demo load processed")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_column("expected", justify="right")
    mismatches: list[str] = []

    def check(what: str, got: int, expected: int | None = None) -> None:
        if expected is not None and got != expected:
            mismatches.append(what)
        table.add_row(what, f"{got:,}", "" if expected is None else f"{expected:,}")

    check("records published", load.total)
    check(
        "charges recorded (one of them through the API)",
        totals["recorded"],
        load.expected["recorded"],
    )
    if load.api is not None:
        check("the seed's HTTP call: status (201: recorded)", load.api.status, 201)
    check("auto-reloads charged at the Stripe stand-in", load.reloads_succeeded, 1)
    check("payout cut: charges paid out (all recorded)", load.payouts[1], load.expected["recorded"])
    check("payout cut: payouts (per payee and currency)", load.payouts[0])
    check("exact duplicates (not applied again)", totals["duplicate"], load.expected["duplicate"])
    check(
        "conflicts (same reference, other payload)", totals["conflict"], load.expected["conflict"]
    )
    for reason in sorted(reasons):
        check(f"dead letters: {reason}", reasons[reason], load.expected[reason])
    check("conflicts kept with both payloads", conflicts)
    check("dead letters still to publish on billing.dlq", unpublished, 0)
    for outcome in ("recorded", "duplicate", "conflict"):
        check(f"usage and grants: {outcome}", usage_totals[outcome], load.expected_usage[outcome])
    for alert_type in sorted(load.expected_alerts):
        check(f"alerts: {alert_type}", alerts[alert_type], load.expected_alerts[alert_type])
    for customer, expected_balance in sorted(load.expected_balances.items()):
        check(f"balance of {customer} (tokens)", balances.get(customer, 0), expected_balance)
    console.print(table)

    flow_table = Table(title="flows")
    for column in ("flow", "payee", "status", "charges", "amounts", "last charge"):
        flow_table.add_column(column)
    for row in flows:
        amounts = (
            orjson.loads(row["amounts"]) if isinstance(row["amounts"], str) else row["amounts"]
        )
        flow_table.add_row(
            row["flow_id"],
            row["payee_ref"],
            row["status"],
            str(row["charge_count"]),
            ", ".join(
                format_money(amount, currency) for currency, amount in sorted(amounts.items())
            ),
            row["last_charge_at"].isoformat(timespec="seconds") if row["last_charge_at"] else "",
        )
    console.print(flow_table)
    metrics = (
        f"http://127.0.0.1:{settings.metrics_port}/metrics" if settings.metrics_port else "off"
    )
    console.print(
        f"Processed in {elapsed:.1f}s.  Postgres: {mask_url(settings.dsn)}  "
        f"Kafka: {settings.kafka_bootstrap_servers}  Metrics (while running): {metrics}\n"
        "`chargeline dev --keep-running` keeps the stack and workers up to look around "
        "(`chargeline flows list`, `charges list`, `balances list`, `dlq list`)."
    )
    if load.api is not None:
        console.print(
            f"API: {load.api.base} (docs: {load.api.base}/docs)  key: {load.api.key}\n"
            f"curl -X POST {load.api.base}/v1/flows/flow_api/charges "
            f"-H 'Authorization: Bearer {load.api.key}' -H 'Content-Type: application/json' "
            '-H \'Prefer: wait=5\' -d \'{"amount": 100, "currency": "EUR", '
            '"customer_ref": "user_123", "reference": "image-job-987"}\''
        )
    if mismatches:
        console.print(f"[red]Not as expected: {', '.join(mismatches)}[/red]")
    return not mismatches


async def run_dev(settings: Settings, *, keep_running: bool = False) -> int:
    stack = None
    if not (
        os.environ.get("CHARGELINE_DATABASE_URL")
        and os.environ.get("CHARGELINE_KAFKA_BOOTSTRAP_SERVERS")
    ):
        from workers.devtools.devstack import LocalStack

        console.print(
            "Starting the embedded stack: Postgres, Tansu (Kafka protocol), localstripe..."
        )
        stack = await asyncio.to_thread(LocalStack.start)
        await _create_database(stack.postgres.url, "chargeline")
        settings = settings.model_copy(update=_stack_settings(stack))
    if settings.log_format == "json" and console.is_terminal:
        settings = settings.model_copy(update={"log_format": "console"})
    configure_logging("warning" if not keep_running else settings.log_level, settings.log_format)
    try:
        await _prepare(settings)
        load = build_demo_load()
        await start_auto_reload(settings, load.auto_reload_customer)
        process = WorkerProcess(settings, ("all",))
        started = time.monotonic()
        task = asyncio.create_task(process.run(install_signal_handlers=keep_running))
        await _publish(settings, load)
        console.print(
            f"Published {len(load.records)} demo records to {settings.topic_charges} and "
            f"{len(load.usage)} to {settings.topic_usage}."
        )
        api = await start_api(settings)
        await seed_call(api)
        load.expected["recorded"] += 1  # the seed's call, through the API
        load.api = api
        done = await _wait_until_processed(settings, process, load.total + 1, 120)
        load.reloads_succeeded = await reloads_succeeded(settings, load.auto_reload_customer, 30)
        load.payouts = await cut_now(settings)
        await outbox_drained(settings, 30)  # the cut's payouts reach billing.payouts too
        elapsed = time.monotonic() - started
        if keep_running:
            await _summary(settings, process, load, elapsed)
            for name, value in _stack_env(settings).items():
                console.print(f"export {name}={value}")
            console.print("Workers and the API keep running; Ctrl-C to stop.")
            await task
            return 0
        process.stop()
        await task
        api.server.should_exit = True
        await api.task
        matches = await _summary(settings, process, load, elapsed)
        if not done:
            console.print("[red]The demo load was not fully processed within 120 s.[/red]")
        return 0 if done and matches else 1
    finally:
        if stack is not None:
            await asyncio.to_thread(stack.stop)


def _stack_env(settings: Settings) -> dict[str, str]:
    """The variables that point `chargeline` commands in another terminal at this stack."""
    return {
        "CHARGELINE_DATABASE_URL": settings.dsn,
        "CHARGELINE_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "CHARGELINE_KAFKA_IDEMPOTENT_PRODUCER": str(settings.kafka_idempotent_producer).lower(),
        "CHARGELINE_TOPIC_CHARGES": settings.topic_charges,
        "CHARGELINE_TOPIC_USAGE": settings.topic_usage,
    }


async def _create_database(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def _stack_settings(stack: Any) -> dict[str, Any]:
    env = stack.env()
    return Settings(
        **{k.removeprefix("CHARGELINE_").lower(): v for k, v in env.items()}
    ).model_dump(
        include={
            "database_url",
            "kafka_bootstrap_servers",
            "kafka_idempotent_producer",
            "stripe_api_base",
            "stripe_api_key",
        }
    )
