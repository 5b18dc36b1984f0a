"""Payouts per payee, currency and period, on billing.payouts, and Stripe
payouts created once, against real Postgres, broker and Stripe stand-in."""

from __future__ import annotations

import asyncio
import csv
import functools
import io
import os
import random
import signal
import subprocess
import sys
import uuid
from collections import Counter
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import stripe
from aiohttp import web
from stripe.params import PayoutListParams

from schemas.outputs import HEADER_PAYOUT_REVISION, PayoutEvent
from tests.support import (
    assert_invariants,
    assert_one_line_error,
    charge,
    cli,
    consume_all,
    create_flows,
    fetch,
    fetchval,
    ingest_done,
    insert_charges,
    ok_json,
    outbox_empty,
    payout_violations,
    produce,
    record,
    running_worker,
    settings_env,
    setup_pipeline,
    wait_for,
)
from workers import db
from workers.jobs.payouts import (
    METADATA_PAYEE,
    METADATA_PAYOUT_ID,
    PayoutWorker,
    StripePayouts,
    change_status,
    cut_payouts,
    period_floor,
)
from workers.metrics import Metrics
from workers.settings import Settings

PAYOUT_FIELDS = {
    "payout_id",
    "payee_ref",
    "currency",
    "period_start",
    "period_end",
    "charge_count",
    "amount",
    "status",
}


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def cut(conn: asyncpg.Connection, settings: Settings) -> Any:
    """Cut now. A cut's time is in milliseconds (as in billing.payouts events): a charge
    recorded within the cut's own millisecond is after it and waits for the next cut, so
    the tests, which cut right after recording, leave that millisecond first."""
    await asyncio.sleep(0.002)
    return await cut_payouts(
        conn, until=None, period=settings.payout_period, topic=settings.topic_payouts
    )


async def unpaid(settings: Settings) -> int:
    return int(await fetchval(settings, "SELECT count(*) FROM charges WHERE payout_id IS NULL"))


async def stand_in_payouts(settings: Settings, payout_id: str) -> list[stripe.Payout]:
    """Every Stripe Payout at the stand-in that carries ``payout_id`` in its metadata."""
    sender = StripePayouts(settings, Metrics())
    found: list[stripe.Payout] = []
    params: PayoutListParams = {"limit": 100}
    try:
        while True:
            page = await sender.gateway.client.v1.payouts.list_async(params)
            found += [
                p
                for p in page.data
                if p.metadata is not None
                and p.metadata.to_dict().get(METADATA_PAYOUT_ID) == payout_id
            ]
            if not page.has_more:
                return found
            params = {"limit": 100, "starting_after": page.data[-1].id}
    finally:
        await sender.close()


def stripe_payee() -> str:
    # The Stripe stand-in lives as long as the test session: a payee of this test's own.
    return f"studio-{uuid.uuid4().hex[:8]}"


async def configure_stripe_payee(settings: Settings, payee: str) -> None:
    conn = await asyncpg.connect(settings.dsn)
    try:
        await conn.execute(db.QUERIES["payee_configure"], payee, "acct_1Studio", True)
    finally:
        await conn.close()


async def test_a_load_is_paid_out_once_per_payee_currency_and_period(settings: Settings) -> None:
    payees = {
        "flow_img": "studio-north",
        "flow_rep": "studio-north",
        "flow_api": "default",
        "flow_ext": "acme",
    }
    await setup_pipeline(settings, partitions=3)
    await create_flows(settings, [("flow_img", "studio-north"), ("flow_rep", "default")])
    await create_flows(settings, [("flow_api", "default"), ("flow_ext", "default")])
    assert ok_json(settings, "flows", "update", "flow_rep", "--payee", "studio-north")["payee_ref"]
    rng = random.Random(5)
    events = [
        charge(
            rng.choice(list(payees)),
            f"user_{rng.randint(1, 30)}",
            f"load-{n}",
            rng.randint(1, 5000),
            currency=rng.choice(["EUR", "EUR", "USD", "JPY"]),
        )
        for n in range(240)
    ]
    late_wave = [
        charge("flow_img", "user_1", f"wave2-{n}", 10 + n, currency="EUR") for n in range(10)
    ] + [charge("flow_ext", "user_2", f"wave2-usd-{n}", 7, currency="USD") for n in range(5)]

    async with running_worker(settings, "charges", "outbox") as process:
        await produce(settings, settings.topic_charges, [record(e) for e in events])
        await wait_for(functools.partial(ingest_done, process, len(events)), what="the load")
        # Charges already recorded follow their flow to its new payee at the next cut.
        updated = ok_json(settings, "flows", "update", "flow_ext", "--payee", "acme")
        assert updated["payee_ref"] == "acme"

        first = ok_json(settings, "payouts", "run")
        expected: dict[tuple[str, str], list[int]] = {}
        for e in events:
            total = expected.setdefault((payees[e["flow_id"]], e["currency"]), [0, 0])
            total[0] += 1
            total[1] += e["amount"]
        assert {
            (p["payee_ref"], p["currency"]): [p["charge_count"], p["amount"]] for p in first
        } == (expected)
        assert all(set(p) >= PAYOUT_FIELDS and p["status"] == "recorded" for p in first)
        assert len({p["payout_id"] for p in first}) == len(first)
        assert len({p["period_end"] for p in first}) == 1  # one cut
        assert await unpaid(settings) == 0
        assert await payout_violations(settings) == []

        # Running it again creates nothing new.
        assert ok_json(settings, "payouts", "run") == []
        assert await fetchval(settings, "SELECT count(*) FROM payouts") == len(first)

        # Charges recorded after the cut go into the next payouts, whose periods start where
        # the previous ones ended.
        await produce(settings, settings.topic_charges, [record(e) for e in late_wave])
        await wait_for(
            functools.partial(ingest_done, process, len(events) + len(late_wave)),
            what="the second wave",
        )
        second = ok_json(settings, "payouts", "run")
        assert {
            (p["payee_ref"], p["currency"]): [p["charge_count"], p["amount"]] for p in second
        } == {
            ("studio-north", "EUR"): [10, sum(10 + n for n in range(10))],
            ("acme", "USD"): [5, 35],
        }
        assert {p["period_start"] for p in second} == {first[0]["period_end"]}
        await wait_for(functools.partial(outbox_empty, settings), what="payouts published")

    # Emission: every payout once on billing.payouts, keyed by payee, as stored.
    payouts = {p["payout_id"]: p for p in first + second}
    messages = await consume_all(settings, settings.topic_payouts, expected=len(payouts))
    assert len(messages) == len(payouts)
    for message in messages:
        event = PayoutEvent.model_validate_json(message.value)
        stored = payouts[event.payout_id]
        assert message.key == event.payee_ref.encode()
        assert (event.payee_ref, event.currency, event.charge_count, event.amount) == (
            stored["payee_ref"],
            stored["currency"],
            stored["charge_count"],
            stored["amount"],
        )
        assert event.period_end == at(stored["period_end"])
        assert event.status == "recorded"

    # list with filters, show with totals and charges, csv export of the charges
    listed = ok_json(settings, "payouts", "list", "--payee", "studio-north", "--currency", "eur")
    assert [p["payout_id"] for p in listed] == [
        p["payout_id"]
        for p in sorted(second + first, key=lambda p: p["period_end"], reverse=True)
        if (p["payee_ref"], p["currency"]) == ("studio-north", "EUR")
    ]
    north_eur = next(p for p in first if (p["payee_ref"], p["currency"]) == ("studio-north", "EUR"))
    shown = ok_json(settings, "payouts", "show", north_eur["payout_id"])
    assert {k: shown[k] for k in PAYOUT_FIELDS} == {k: north_eur[k] for k in PAYOUT_FIELDS}
    assert len(shown["charges"]) == north_eur["charge_count"]
    assert sum(c["amount"] for c in shown["charges"]) == north_eur["amount"]
    assert {f["flow_id"] for f in shown["by_flow"]} == {"flow_img", "flow_rep"}
    assert sum(f["amount"] for f in shown["by_flow"]) == north_eur["amount"]
    exported = cli(settings, "payouts", "show", north_eur["payout_id"], "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert len(rows) == north_eur["charge_count"]
    assert sum(int(r["amount"]) for r in rows) == north_eur["amount"]
    assert {r["reference"] for r in rows} == {c["reference"] for c in shown["charges"]}


async def test_payout_workers_close_each_period_once_and_send_stripe_payouts(
    settings: Settings,
) -> None:
    # Grace of 30 minutes: the three periods below are always due, the current one never.
    settings = settings.model_copy(update={"payout_grace_s": 1800, "payout_interval_s": 0.2})
    north = stripe_payee()
    await create_flows(settings, [("flow_a", north), ("flow_b", "south")])
    await configure_stripe_payee(settings, north)
    conn = await asyncpg.connect(settings.dsn)
    try:
        last_closed = period_floor(await conn.fetchval("SELECT now()"), "hourly") - timedelta(
            hours=1
        )
        expected: dict[tuple[str, str, datetime], tuple[int, int]] = {}
        for back in (3, 2, 1):
            period_end = last_closed - timedelta(hours=back - 1)
            recorded_at = period_end - timedelta(minutes=7 * back)
            for flow, payee in (("flow_a", north), ("flow_b", "south")):
                for currency in ("EUR", "USD"):
                    if back == 2 and currency == "USD":
                        continue  # no USD charges in that hour: no USD payouts for it
                    total = await insert_charges(
                        conn, flow, 5, currency=currency, recorded_at=recorded_at, prefix=f"h{back}"
                    )
                    expected[(payee, currency, period_end)] = (5, total)
        await insert_charges(conn, "flow_a", 4, prefix="current")  # this hour: not closed yet
    finally:
        await conn.close()

    async def settled() -> bool:
        return bool(
            await fetchval(settings, "SELECT count(*) FROM payout_cuts") == 3
            and not await fetchval(
                settings, "SELECT count(*) FROM payouts WHERE status = 'pending'"
            )
        )

    # Two payout workers at once.
    async with (
        running_worker(settings, "payouts") as one,
        running_worker(settings, "payouts") as two,
    ):
        await wait_for(settled, timeout=30, what="three periods closed, Stripe payouts sent")
        await asyncio.sleep(1)  # a few more ticks of both: nothing more may happen

    rows = await fetch(settings, "SELECT * FROM payouts ORDER BY period_end, payee_ref, currency")
    assert {
        (r["payee_ref"], r["currency"], r["period_end"]): (r["charge_count"], r["amount"])
        for r in rows
    } == expected
    assert await fetchval(settings, "SELECT count(*) FROM payout_cuts") == 3
    assert await unpaid(settings) == 4
    assert await payout_violations(settings) == []
    # A first payout starts with its period; the next ones where the previous one ended.
    previous: dict[tuple[str, str], datetime] = {}
    for r in rows:
        key = (r["payee_ref"], r["currency"])
        assert r["period_start"] == previous.get(key, last_closed - timedelta(hours=3))
        previous[key] = r["period_end"]
    # The Stripe payee's EUR payouts were sent, once each; the stand-in refuses USD.
    status = Counter((r["payee_ref"], r["currency"], r["status"]) for r in rows)
    assert status == {
        (north, "EUR", "sent"): 3,
        (north, "USD", "failed"): 2,
        ("south", "EUR", "recorded"): 3,
        ("south", "USD", "recorded"): 2,
    }
    for r in rows:
        if r["status"] == "sent":
            at_stripe = await stand_in_payouts(settings, r["payout_id"])
            assert [(p.id, p.amount, p.currency) for p in at_stripe] == [
                (r["stripe_payout_id"], r["amount"], "eur")
            ]
            assert at_stripe[0].metadata is not None
            assert at_stripe[0].metadata.to_dict()[METADATA_PAYEE] == north
        if r["status"] == "failed":
            assert (r["failure_code"], r["failure_message"]) == (
                "invalid_request_error",
                "Bad request",
            )
    # Metrics: the two workers together counted every payout once.
    samples: Counter[str] = Counter()
    for process in (one, two):
        for currency in ("EUR", "USD"):
            value = process.metrics.registry.get_sample_value(
                "chargeline_payouts_total", {"currency": currency}
            )
            samples[currency] += int(value or 0)
        assert process.metrics.registry.get_sample_value("chargeline_charges_awaiting_payout") == 4
        age = process.metrics.registry.get_sample_value(
            "chargeline_oldest_unpaid_charge_age_seconds"
        )
        assert age is not None and 0 <= age < 60
    assert samples == Counter(EUR=6, USD=4)


async def test_concurrent_cuts_never_put_a_charge_in_two_payouts(settings: Settings) -> None:
    rng = random.Random(11)
    await create_flows(settings, [("flow_a", "north"), ("flow_b", "south"), ("flow_c", "north")])
    conns = [await asyncpg.connect(settings.dsn) for _ in range(4)]

    async def record_charges(conn: asyncpg.Connection) -> int:
        total = 0
        for n in range(40):
            total += await insert_charges(
                conn,
                rng.choice(["flow_a", "flow_b", "flow_c"]),
                rng.randint(1, 60),
                currency=rng.choice(["EUR", "USD"]),
                prefix=f"w{n}",
            )
        return total

    async def cut_repeatedly(conn: asyncpg.Connection) -> int:
        made = 0
        for _ in range(15):
            made += len((await cut(conn, settings)).payouts)
        return made

    try:
        recorded, *made = await asyncio.gather(
            record_charges(conns[0]),
            cut_repeatedly(conns[1]),
            cut_repeatedly(conns[2]),
            cut_repeatedly(conns[3]),
        )
        made.append(len((await cut(conns[1], settings)).payouts))  # what the load left
    finally:
        for conn in conns:
            await conn.close()
    assert await unpaid(settings) == 0
    assert await payout_violations(settings) == []
    totals = await fetch(settings, "SELECT count(*) AS payouts, sum(amount) AS amount FROM payouts")
    assert totals[0]["payouts"] == sum(made)
    assert totals[0]["amount"] == recorded
    assert await fetchval(settings, "SELECT sum(charge_count) FROM payouts") == await fetchval(
        settings, "SELECT count(*) FROM charges"
    )
    # Per payee and currency, periods follow each other without gap or overlap.
    breaks = await fetchval(
        settings,
        """SELECT count(*) FROM (
               SELECT period_start,
                      lag(period_end) OVER (PARTITION BY payee_ref, currency
                                            ORDER BY period_end) AS previous_end
               FROM payouts) p
           WHERE previous_end IS NOT NULL AND previous_end <> period_start""",
    )
    assert breaks == 0


async def test_a_charge_committed_after_a_cut_goes_into_the_next_payout(
    settings: Settings,
) -> None:
    await create_flows(settings, [("flow_a", "north")])
    producer = await asyncpg.connect(settings.dsn)
    cutter = await asyncpg.connect(settings.dsn)
    try:
        early = await insert_charges(cutter, "flow_a", 3, prefix="early")
        # A charges transaction records two charges (recorded_at = its start) and is still
        # open while the period is cut.
        transaction = producer.transaction()
        await transaction.start()
        late = await insert_charges(producer, "flow_a", 2, prefix="late")
        late_recorded_at = await producer.fetchval("SELECT now()")
        first = await cut(cutter, settings)
        assert late_recorded_at < first.period_end
        assert [(p["charge_count"], p["amount"]) for p in first.payouts] == [(3, early)]
        await transaction.commit()
        # Recorded before the closed period's end, committed after it: not in that payout...
        rows = await cutter.fetch("SELECT payout_id FROM charges WHERE reference LIKE 'late-%'")
        assert [r["payout_id"] for r in rows] == [None, None]
        after = await insert_charges(cutter, "flow_a", 1, prefix="after")  # after the cut
        second = await cut(cutter, settings)
    finally:
        await producer.close()
        await cutter.close()
    # ...but in the next one, with the charge recorded after the cut; the closed one is as it was.
    assert [(p["charge_count"], p["amount"]) for p in second.payouts] == [(3, late + after)]
    assert second.payouts[0]["period_start"] == first.period_end
    closed = await fetch(
        settings,
        "SELECT charge_count, amount FROM payouts WHERE payout_id = $1",
        first.payouts[0]["payout_id"],
    )
    assert [(r["charge_count"], r["amount"]) for r in closed] == [(3, early)]
    assert await unpaid(settings) == 0
    assert await payout_violations(settings) == []


def spawn_cut(settings: Settings) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "workers.cli.main", "payouts", "run"],
        env={**os.environ, **settings_env(settings)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def others_gone(settings: Settings) -> bool:
    """No other session on this test's database: a killed run's transaction is over."""
    return not await fetchval(
        settings,
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )


async def test_a_run_killed_mid_transaction_leaves_no_payout(settings: Settings) -> None:
    await create_flows(settings, [("flow_a", "north"), ("flow_b", "south")])
    blocker = await asyncpg.connect(settings.dsn)
    try:
        await insert_charges(blocker, "flow_a", 300)
        await insert_charges(blocker, "flow_b", 200, currency="USD")
        # Hold the outbox: the run writes its payouts and claims the charges, then waits to
        # write its outbox rows, in the middle of its transaction.
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("LOCK TABLE outbox IN EXCLUSIVE MODE")
        run = spawn_cut(settings)
        try:
            pid = None

            async def blocked() -> bool:
                nonlocal pid
                pid = await fetchval(
                    settings,
                    "SELECT pid FROM pg_locks WHERE relation = 'outbox'::regclass AND NOT granted",
                )
                return pid is not None

            await wait_for(blocked, timeout=30, what="the run to wait for the outbox")
            written = await fetch(
                settings,
                "SELECT relation::regclass::text AS relation FROM pg_locks "
                "WHERE pid = $1 AND granted AND mode = 'RowExclusiveLock'",
                pid,
            )
            assert {"payouts", "charges"} <= {r["relation"] for r in written}
            run.send_signal(signal.SIGKILL)
            run.wait(timeout=10)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait(timeout=10)
            await transaction.rollback()
    finally:
        await blocker.close()
    await wait_for(functools.partial(others_gone, settings), timeout=30, what="the run to end")
    assert await fetchval(settings, "SELECT count(*) FROM payouts") == 0
    assert await fetchval(settings, "SELECT count(*) FROM payout_cuts") == 0
    assert await fetchval(settings, "SELECT count(*) FROM outbox") == 0
    assert await unpaid(settings) == 500
    # The next run pays everything, whole.
    assert sorted(
        (p["currency"], p["charge_count"]) for p in ok_json(settings, "payouts", "run")
    ) == [
        ("EUR", 300),
        ("USD", 200),
    ]
    assert await payout_violations(settings) == []


async def wait_for_cut_lock(settings: Settings, timeout: float = 30) -> None:
    """Until a run holds the cut lock: its transaction is open. Polled every millisecond."""
    conn = await asyncpg.connect(settings.dsn)
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while not await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ):
            assert asyncio.get_running_loop().time() < deadline, "no run took the cut lock"
            await asyncio.sleep(0.001)
    finally:
        await conn.close()


async def test_runs_killed_at_random_moments_leave_whole_payouts_or_none(
    settings: Settings,
) -> None:
    rng = random.Random(3)
    await create_flows(settings, [("flow_a", "north"), ("flow_b", "south")])
    outcomes: Counter[str] = Counter()
    for round_ in range(4):
        conn = await asyncpg.connect(settings.dsn)
        try:
            for flow in ("flow_a", "flow_b"):  # 5000 charges and more: cuts of 60 ms and more
                await insert_charges(conn, flow, 2500, prefix=f"k{round_}")
        finally:
            await conn.close()
        before = await fetchval(settings, "SELECT count(*) FROM payouts")
        due = await unpaid(settings)  # with what killed rounds left
        run = spawn_cut(settings)
        try:
            await wait_for_cut_lock(settings)
            await asyncio.sleep(rng.uniform(0, 0.05))
            run.send_signal(signal.SIGKILL)
        finally:
            run.wait(timeout=10)
        await wait_for(functools.partial(others_gone, settings), timeout=30, what="the run to end")
        after = await fetchval(settings, "SELECT count(*) FROM payouts")
        outcomes["whole payouts" if after > before else "no payout"] += 1
        # Either every due charge went into whole payouts, or nothing happened.
        assert await payout_violations(settings) == []
        assert (after > before, await unpaid(settings)) in ((True, 0), (False, due))
    print(f"SIGKILLed 4 runs during their transaction: {dict(outcomes)}")
    assert outcomes["no payout"] >= 1  # the kills did land inside transactions
    ok_json(settings, "payouts", "run")
    assert await unpaid(settings) == 0
    assert await payout_violations(settings) == []


async def test_stripe_payouts_are_created_once_even_when_a_sender_dies(
    settings: Settings,
) -> None:
    payee = stripe_payee()
    await create_flows(settings, [("flow_s", payee), ("flow_d", "default")])
    configured = ok_json(
        settings,
        "payees",
        "configure",
        payee,
        "--stripe-account",
        "acct_1Studio",
        "--stripe-payouts",
        "on",
    )
    assert configured == {
        "payee_ref": payee,
        "stripe_account": "acct_1Studio",
        "stripe_payouts": True,
        "flows": 1,
    }
    conn = await asyncpg.connect(settings.dsn)
    pool = await db.create_pool(settings.dsn, min_size=1, max_size=2)
    sender = StripePayouts(settings, Metrics())
    try:
        eur = await insert_charges(conn, "flow_s", 20)
        await insert_charges(conn, "flow_s", 5, currency="USD")
        await insert_charges(conn, "flow_d", 5)
        payouts = {(p["payee_ref"], p["currency"]): p for p in (await cut(conn, settings)).payouts}
        assert {k: p["status"] for k, p in payouts.items()} == {
            (payee, "EUR"): "pending",
            (payee, "USD"): "pending",
            ("default", "EUR"): "recorded",
        }
        payout_id = payouts[(payee, "EUR")]["payout_id"]
        # A sender records its attempt, Stripe creates the payout, and the sender dies before
        # it can mark the payout sent.
        row = await conn.fetchrow(db.QUERIES["payouts_to_send"], 10)
        assert row["payout_id"] == payout_id
        earlier = await sender.start_attempt(conn, payout_id)
        assert earlier == 0
        created = await sender.submit(dict(row.items()), earlier_attempts=earlier)
        assert len(await stand_in_payouts(settings, payout_id)) == 1
        # The next sender finds that payout instead of creating a second one.
        assert await sender.send_pending(pool) == Counter(sent=1, failed=1)
        assert await sender.send_pending(pool) == Counter()
    finally:
        await sender.close()
        await pool.close()
        await conn.close()
    assert ok_json(settings, "payouts", "send") == {"sent": 0, "failed": 0, "skipped": 0}
    at_stripe = await stand_in_payouts(settings, payout_id)
    assert [(p.id, p.amount, p.currency) for p in at_stripe] == [(created.id, eur, "eur")]
    stored = ok_json(settings, "payouts", "show", payout_id)
    assert (stored["status"], stored["stripe_payout_id"], stored["stripe_attempts"]) == (
        "sent",
        created.id,
        2,
    )
    failed = ok_json(settings, "payouts", "list", "--status", "failed")
    assert [(p["payee_ref"], p["currency"], p["failure_code"]) for p in failed] == [
        (payee, "USD", "invalid_request_error")
    ]


class DropFirstAnswers:
    """A TCP proxy to the Stripe stand-in that hangs up instead of relaying its first
    ``drops`` answers: the request reached Stripe (the payout exists), the answer is lost."""

    def __init__(self, upstream: str, drops: int) -> None:
        parts = urlsplit(upstream)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.drops = drops
        self.dropped = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        drop = self.dropped < self.drops
        self.dropped += drop
        to_stripe = asyncio.create_task(self._pipe(reader, up_writer))
        try:
            if drop:
                await up_reader.read(1)  # Stripe is answering: the request was handled
            else:
                await self._pipe(up_reader, writer)
        finally:
            to_stripe.cancel()
            await asyncio.gather(to_stripe, return_exceptions=True)
            for w in (writer, up_writer):
                w.close()
                await asyncio.gather(w.wait_closed(), return_exceptions=True)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


async def test_a_lost_stripe_answer_is_retried_without_a_second_payout(
    settings: Settings,
) -> None:
    payee = stripe_payee()
    await create_flows(settings, [("flow_s", payee)])
    await configure_stripe_payee(settings, payee)
    conn = await asyncpg.connect(settings.dsn)
    try:
        total = await insert_charges(conn, "flow_s", 12)
        (payout,) = (await cut(conn, settings)).payouts
    finally:
        await conn.close()
    async with DropFirstAnswers(settings.stripe_api_base or "", drops=1) as proxy_url:
        flaky = settings.model_copy(update={"stripe_api_base": proxy_url, "retry_initial_ms": 20})
        pool = await db.create_pool(settings.dsn, min_size=1, max_size=2)
        worker = PayoutWorker(flaky, pool, Metrics())
        try:
            assert await worker.send() == Counter(sent=1)
        finally:
            await worker.stripe.close()
            await pool.close()
    retries = worker.metrics.registry.get_sample_value(
        "chargeline_retries_total", {"component": "stripe"}
    )
    assert retries == 1
    lost = worker.metrics.registry.get_sample_value(
        "chargeline_stripe_errors_total",
        {"call": "payouts.create", "error": "APIConnectionError"},
    )
    assert lost == 1
    at_stripe = await stand_in_payouts(settings, payout["payout_id"])
    assert [(p.amount, p.currency) for p in at_stripe] == [(total, "eur")]
    rows = await fetch(
        settings,
        "SELECT status, stripe_payout_id, stripe_attempts FROM payouts WHERE payout_id = $1",
        payout["payout_id"],
    )
    assert [tuple(r.values()) for r in rows] == [("sent", at_stripe[0].id, 2)]


async def test_payout_commands_refuse_bad_requests_in_one_line(settings: Settings) -> None:
    await create_flows(settings, [("flow_a", "north")])
    conn = await asyncpg.connect(settings.dsn)
    try:
        await insert_charges(conn, "flow_a", 2)
        now = await conn.fetchval("SELECT now()")
    finally:
        await conn.close()
    (first,) = ok_json(settings, "payouts", "run")
    # The last cut's own time again: already cut, nothing new.
    assert ok_json(settings, "payouts", "run", "--until", first["period_end"]) == []
    future = (now + timedelta(hours=1)).isoformat()
    assert_one_line_error(
        cli(settings, "payouts", "run", "--until", future), code=2, mentions="in the future"
    )
    assert_one_line_error(
        cli(settings, "payouts", "run", "--until", "2000-01-01"),
        code=1,
        mentions="closed up to",
    )
    assert_one_line_error(
        cli(settings, "payouts", "show", "po_nope"), code=1, mentions="no payout 'po_nope'"
    )
    assert_one_line_error(
        cli(settings, "payees", "configure", "north", "--stripe-payouts", "on"),
        code=2,
        mentions="no Stripe account",
    )
    assert_one_line_error(
        cli(settings, "flows", "update", "nope", "--name", "x"),
        code=1,
        mentions="no flow 'nope'",
    )
    assert_one_line_error(
        cli(settings, "flows", "update", "flow_a"), code=2, mentions="nothing to change"
    )
    assert ok_json(settings, "payees", "list") == [
        {"payee_ref": "north", "stripe_account": None, "stripe_payouts": False, "flows": 1}
    ]


# --- an operator finishes a payout: retry, cancel, and every status change published ---


class StripeRefuses:
    """A proxy to the Stripe stand-in that answers some calls itself with a Stripe error (as
    Stripe would: status and JSON body, parsed by the SDK) and passes the others on.
    ``refusals`` maps (method, path) to (HTTP status, Stripe's error object)."""

    def __init__(self, upstream: str, refusals: dict[tuple[str, str], tuple[int, Any]]) -> None:
        self.upstream = upstream.rstrip("/")
        self.refusals = refusals
        self.refused = 0

    async def __aenter__(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.session = aiohttp.ClientSession()
        host, port = self.runner.addresses[0][:2]
        return f"http://{host}:{port}"

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()
        await self.runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        refusal = self.refusals.get((request.method, request.path))
        if refusal is not None:
            self.refused += 1
            return web.json_response({"error": refusal[1]}, status=refusal[0])
        passed = {
            name: value
            for name, value in request.headers.items()
            if name.lower() not in ("host", "content-length", "transfer-encoding")
        }
        async with self.session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=passed,
            data=await request.read(),
        ) as answer:
            return web.Response(
                status=answer.status,
                body=await answer.read(),
                content_type=answer.content_type,
            )


NO_FUNDS = (
    400,
    {
        "type": "invalid_request_error",
        "code": "balance_insufficient",
        "message": "You have insufficient funds in your Stripe account.",
    },
)
NO_ACCESS = (
    403,
    {
        "type": "invalid_request_error",
        "message": "The provided key does not have access to account 'acct_1Studio'.",
    },
)


async def send_through(
    settings: Settings, refusals: dict[tuple[str, str], tuple[int, Any]]
) -> Counter[str]:
    """One sender's turn (``send_pending``, as the worker's) against a Stripe refusing some calls."""
    async with StripeRefuses(settings.stripe_api_base or "", refusals) as proxy_url:
        refusing = settings.model_copy(update={"stripe_api_base": proxy_url})
        pool = await db.create_pool(settings.dsn, min_size=1, max_size=2)
        sender = StripePayouts(refusing, Metrics())
        try:
            return await sender.send_pending(pool)
        finally:
            await sender.close()
            await pool.close()


async def stripe_payout_cut(settings: Settings, charges: int) -> dict[str, Any]:
    """A Stripe payee of this test's own and ``charges`` EUR charges of it, cut: its payout."""
    payee = stripe_payee()
    await create_flows(settings, [("flow_s", payee)])
    await configure_stripe_payee(settings, payee)
    conn = await asyncpg.connect(settings.dsn)
    try:
        await insert_charges(conn, "flow_s", charges)
        payouts: list[dict[str, Any]] = (await cut(conn, settings)).payouts
    finally:
        await conn.close()
    (payout,) = payouts
    assert payout["status"] == "pending"
    return payout


async def published_changes(settings: Settings, expected: int) -> dict[str, list[tuple[str, int]]]:
    """Publish the outbox (a relay in this process), then read billing.payouts: per payout, its
    (status, revision header) in topic order; every record keyed by its payee."""
    async with running_worker(settings, "outbox"):
        await wait_for(functools.partial(outbox_empty, settings), timeout=30, what="published")
    messages = await consume_all(settings, settings.topic_payouts, expected=expected)
    assert len(messages) == expected
    changes: dict[str, list[tuple[str, int]]] = {}
    for message in sorted(messages, key=lambda m: (m.partition, m.offset)):
        event = PayoutEvent.model_validate_json(message.value)
        assert message.key == event.payee_ref.encode()
        (revision,) = [v for k, v in message.headers if k == HEADER_PAYOUT_REVISION]
        changes.setdefault(event.payout_id, []).append((event.status, int(revision)))
    return changes


async def test_a_failed_payout_retried_is_found_at_stripe_not_created_again(
    settings: Settings,
) -> None:
    await setup_pipeline(settings, partitions=3)
    payout = await stripe_payout_cut(settings, 8)
    payout_id = payout["payout_id"]
    # A sender records its attempt, Stripe creates the payout, and the sender dies before it
    # can mark it sent (as in the test above).
    conn = await asyncpg.connect(settings.dsn)
    sender = StripePayouts(settings, Metrics())
    try:
        row = await conn.fetchrow(db.QUERIES["payouts_to_send"], 10)
        assert await sender.start_attempt(conn, payout_id) == 0
        created = await sender.submit(dict(row.items()), earlier_attempts=0)
    finally:
        await sender.close()
        await conn.close()
    # The next sender may not look payouts up at Stripe: it marks the payout failed, though
    # Stripe holds it.
    refused = {("GET", "/v1/payouts"): NO_ACCESS}
    assert await send_through(settings, refused) == Counter(failed=1)
    assert [p.id for p in await stand_in_payouts(settings, payout_id)] == [created.id]

    # Cancelling it would pay its charges twice: refused, nothing changed.
    assert_one_line_error(
        cli(settings, "payouts", "cancel", payout_id),
        code=1,
        mentions=f"Stripe holds it as {created.id}",
    )
    assert await unpaid(settings) == 0
    # Retried: its earlier attempts make the send look first; it finds the payout and
    # records it as sent.
    retried = ok_json(settings, "payouts", "retry", payout_id)
    assert (retried["status"], retried["stripe_payout_id"], retried["stripe_attempts"]) == (
        "sent",
        created.id,
        3,
    )
    assert [p.id for p in await stand_in_payouts(settings, payout_id)] == [created.id]
    assert_one_line_error(
        cli(settings, "payouts", "retry", payout_id), code=2, mentions="is sent, not failed"
    )
    assert await published_changes(settings, expected=4) == {
        payout_id: [("pending", 1), ("failed", 2), ("pending", 3), ("sent", 4)]
    }
    assert await payout_violations(settings) == []


async def test_a_retry_that_dies_after_stripe_created_the_payout_never_creates_a_second(
    settings: Settings,
) -> None:
    await setup_pipeline(settings, partitions=3)
    payout = await stripe_payout_cut(settings, 5)
    payout_id = payout["payout_id"]
    # Stripe refuses it: not enough funds.
    assert await send_through(settings, {("POST", "/v1/payouts"): NO_FUNDS}) == Counter(failed=1)
    stored = ok_json(settings, "payouts", "show", payout_id)
    assert (stored["status"], stored["failure_code"], stored["stripe_attempts"]) == (
        "failed",
        "balance_insufficient",
        1,
    )
    assert await stand_in_payouts(settings, payout_id) == []
    # `payouts retry` puts it back to pending, records its attempt, Stripe creates the payout,
    # and the command dies before it can mark it sent: the steps of retry_payout, cut short.
    conn = await asyncpg.connect(settings.dsn)
    sender = StripePayouts(settings, Metrics())
    try:
        reopened = await change_status(conn, "payout_reopen", payout_id, topic=sender.topic)
        assert reopened is not None
        assert (reopened["status"], reopened["stripe_attempts"]) == ("pending", 1)
        earlier = await sender.start_attempt(conn, payout_id)
        assert earlier == 1
        created = await sender.submit(reopened, earlier_attempts=earlier)
    finally:
        await sender.close()
        await conn.close()
    assert [p.id for p in await stand_in_payouts(settings, payout_id)] == [created.id]
    # Pending again: no longer the operator's to retry, but the senders'.
    assert_one_line_error(
        cli(settings, "payouts", "retry", payout_id), code=2, mentions="is pending, not failed"
    )
    assert_one_line_error(
        cli(settings, "payouts", "cancel", payout_id), code=2, mentions="Stripe attempt(s) started"
    )
    # The next send finds the payout instead of creating a second one.
    assert ok_json(settings, "payouts", "send") == {"sent": 1, "failed": 0, "skipped": 0}
    at_stripe = await stand_in_payouts(settings, payout_id)
    assert [(p.id, p.amount) for p in at_stripe] == [(created.id, payout["amount"])]
    stored = ok_json(settings, "payouts", "show", payout_id)
    assert (stored["status"], stored["stripe_payout_id"], stored["stripe_attempts"]) == (
        "sent",
        created.id,
        3,
    )
    assert stored["failure_code"] is None
    assert await published_changes(settings, expected=4) == {
        payout_id: [("pending", 1), ("failed", 2), ("pending", 3), ("sent", 4)]
    }


async def test_a_cancelled_payout_releases_its_charges_to_the_next_cut(settings: Settings) -> None:
    await setup_pipeline(settings, partitions=3)
    payee = stripe_payee()
    await create_flows(settings, [("flow_s", payee)])
    await configure_stripe_payee(settings, payee)
    conn = await asyncpg.connect(settings.dsn)
    try:
        usd = await insert_charges(conn, "flow_s", 4, currency="USD")
        eur = await insert_charges(conn, "flow_s", 3, currency="EUR")
        first = {p["currency"]: p for p in (await cut(conn, settings)).payouts}
    finally:
        await conn.close()
    usd_id, eur_id = first["USD"]["payout_id"], first["EUR"]["payout_id"]
    # Pending and never attempted: nothing can be at Stripe, so it may be cancelled too.
    cancelled_eur = ok_json(settings, "payouts", "cancel", eur_id)
    assert (cancelled_eur["status"], cancelled_eur["charge_count"], cancelled_eur["amount"]) == (
        "cancelled",
        3,
        eur,
    )
    # The stand-in refuses USD payouts: failed, then failed again when retried.
    assert ok_json(settings, "payouts", "send") == {"sent": 0, "failed": 1, "skipped": 0}
    assert_one_line_error(
        cli(settings, "payouts", "retry", usd_id),
        code=1,
        mentions="failed again: Stripe refused it (invalid_request_error: Bad request)",
    )
    assert ok_json(settings, "payouts", "show", usd_id)["stripe_attempts"] == 2
    # Cancelled: its charges are released, in the same transaction.
    cancelled = ok_json(settings, "payouts", "cancel", usd_id)
    assert (cancelled["status"], cancelled["charge_count"], cancelled["amount"]) == (
        "cancelled",
        4,
        usd,
    )
    assert cancelled["cancelled_at"] is not None
    assert await unpaid(settings) == 7
    assert await fetchval(settings, "SELECT count(*) FROM charges WHERE status = 'paid_out'") == 0
    assert ok_json(settings, "payouts", "show", usd_id)["charges"] == []
    listed = ok_json(settings, "payouts", "list", "--status", "cancelled")
    assert [p["payout_id"] for p in listed] == [eur_id, usd_id]
    # A cancelled payout keeps what it held, and verify holds it to having no charge.
    await assert_invariants(settings)
    conn = await asyncpg.connect(settings.dsn)
    try:
        await conn.execute(
            "UPDATE charges SET status = 'paid_out', payout_id = $1 "
            "WHERE charge_id = (SELECT min(charge_id) FROM charges WHERE currency = 'USD')",
            usd_id,
        )
        assert [v["payout_id"] for v in await payout_violations(settings)] == [usd_id]
        await conn.execute(
            "UPDATE charges SET status = 'recorded', payout_id = NULL WHERE payout_id = $1", usd_id
        )
    finally:
        await conn.close()
    assert_one_line_error(
        cli(settings, "payouts", "cancel", usd_id),
        code=2,
        mentions="is cancelled: already cancelled",
    )
    assert_one_line_error(
        cli(settings, "payouts", "retry", usd_id), code=2, mentions="is cancelled, not failed"
    )

    # Paid outside Stripe from now on; the next cut takes the released charges, its payouts
    # taking over the cancelled ones' periods.
    ok_json(settings, "payees", "configure", payee, "--stripe-payouts", "off")
    await asyncio.sleep(0.002)  # the cut's millisecond is after the charges' (see cut())
    second = {p["currency"]: p for p in ok_json(settings, "payouts", "run")}
    assert {c: (p["charge_count"], p["amount"], p["status"]) for c, p in second.items()} == {
        "USD": (4, usd, "recorded"),
        "EUR": (3, eur, "recorded"),
    }
    for currency, payout in second.items():
        assert at(payout["period_start"]) == first[currency]["period_start"]
    assert await unpaid(settings) == 0
    await assert_invariants(settings)
    assert await published_changes(settings, expected=9) == {
        eur_id: [("pending", 1), ("cancelled", 2)],
        usd_id: [("pending", 1), ("failed", 2), ("pending", 3), ("failed", 4), ("cancelled", 5)],
        second["EUR"]["payout_id"]: [("recorded", 1)],
        second["USD"]["payout_id"]: [("recorded", 1)],
    }


async def test_retry_and_cancel_refuse_what_they_cannot_do_in_one_line(settings: Settings) -> None:
    await create_flows(settings, [("flow_a", "north")])
    conn = await asyncpg.connect(settings.dsn)
    try:
        await insert_charges(conn, "flow_a", 2)
        (recorded,) = (await cut(conn, settings)).payouts
    finally:
        await conn.close()
    for action in ("retry", "cancel"):
        assert_one_line_error(
            cli(settings, "payouts", action, "po_nope"), code=1, mentions="no payout 'po_nope'"
        )
        assert_one_line_error(cli(settings, "payouts", action), code=2, mentions="required: ID")
    assert_one_line_error(
        cli(settings, "payouts", "retry", recorded["payout_id"]),
        code=2,
        mentions="is recorded, not failed: its payee is paid outside chargeline",
    )
    assert_one_line_error(
        cli(settings, "payouts", "cancel", recorded["payout_id"]),
        code=2,
        mentions="is recorded: its payee is paid outside chargeline",
    )
    assert ok_json(settings, "payouts", "show", recorded["payout_id"])["status"] == "recorded"
    assert await fetchval(settings, "SELECT count(*) FROM outbox") == 1  # the cut's only
