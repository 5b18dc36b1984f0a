"""Auto-reload and top-ups through the Stripe stand-in (localstripe),
with the real `stripe` SDK; no card data kept; one PaymentIntent per crossing."""

from __future__ import annotations

import asyncio
import functools
import io
import logging
from contextlib import redirect_stderr
from decimal import Decimal

import asyncpg
import orjson
import pytest

from tests.support import (
    Stack,
    alerts_on_topic,
    assert_invariants,
    cli,
    fetch,
    fetchval,
    grant,
    ingest_done,
    intents_of,
    outbox_empty,
    produce,
    record,
    running_worker,
    setup_pipeline,
    stripe_customer,
    usage,
    wait_for,
)
from workers.jobs.reloads import ReloadProcessor, cost_basis
from workers.metrics import Metrics
from workers.settings import Settings

GOOD_CARD = "4242424242424242"
DECLINED_CARD = "4000000000000341"  # attaches, declined when charged


def configure(settings: Settings, customer: str, stripe_id: str, *extra: str) -> None:
    done = cli(
        settings, "customers", "configure", customer, "--stripe-customer", stripe_id,
        "--auto-reload", "on", "--reload-threshold", "1000", "--reload-tokens", "5000",
        "--reload-price", "500", "--currency", "EUR", *extra,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def fast(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"reload_interval_s": 0.1, "retry_initial_ms": 50, "retry_max_ms": 500}
    )


async def reloads(settings: Settings) -> list[asyncpg.Record]:
    return await fetch(settings, "SELECT * FROM reload_requests ORDER BY created_at")


async def test_crossing_the_threshold_charges_once_and_grants(settings: Settings) -> None:
    await setup_pipeline(settings, partitions=1)
    cus = await stripe_customer(settings, GOOD_CARD)
    configure(settings, "c1", cus)
    events = [grant("c1", "g0", 1_200)] + [usage("c1", f"u{n}", 50) for n in range(20)]

    async with running_worker(fast(settings)) as process:
        # Two batches: the crossing happens in the first, the second stays below.
        await produce(settings, settings.topic_usage, [record(e) for e in events[:12]])
        await wait_for(functools.partial(ingest_done, process, 12), what="first half")
        await produce(settings, settings.topic_usage, [record(e) for e in events[12:]])
        await wait_for(functools.partial(ingest_done, process, 21), what="second half")

        async def reloaded() -> bool:
            return bool(
                await fetchval(
                    settings, "SELECT count(*) FROM reload_requests WHERE status = 'succeeded'"
                )
            )

        await wait_for(reloaded, what="the reload")
        await wait_for(functools.partial(outbox_empty, settings), what="alerts published")

    intents = await intents_of(settings, cus)
    assert [(i.amount, i.currency, i.status) for i in intents] == [(500, "eur", "succeeded")]
    rows = await reloads(settings)
    assert [(r["kind"], r["status"], r["payment_intent_id"]) for r in rows] == [
        ("auto", "succeeded", intents[0].id)
    ]
    granted = await fetch(
        settings,
        "SELECT reference, tokens, source, cost_basis FROM grants WHERE source = 'auto_reload'",
    )
    assert [(g["reference"], g["tokens"], g["cost_basis"]) for g in granted] == [
        (intents[0].id, 5_000, Decimal("0.001"))
    ]
    assert (
        await fetchval(settings, "SELECT balance FROM customers WHERE customer_ref = 'c1'")
        == 1_200 - 1_000 + 5_000
    )
    alerts = await alerts_on_topic(settings, expected=2)
    assert [a["type"] for a in alerts].count("auto_reload_succeeded") == 1
    await assert_invariants(settings)


async def test_a_worker_dying_after_the_charge_does_not_charge_again(settings: Settings) -> None:
    """The crash point: Stripe charged, nothing recorded. Reproduced exactly by making the
    charge with the worker's own code and leaving the request claimed; the next worker
    finds the PaymentIntent, grants once, and creates no second one."""
    await setup_pipeline(settings, partitions=1)
    cus = await stripe_customer(settings, GOOD_CARD)
    configure(settings, "c1", cus)
    short_lease = fast(settings).model_copy(update={"reload_lease_s": 0.5})
    async with running_worker(settings, "usage") as process:
        await produce(
            settings,
            settings.topic_usage,
            [record(grant("c1", "g0", 1_200)), record(usage("c1", "u1", 500))],
        )
        await wait_for(functools.partial(ingest_done, process, 2), what="usage")
    pool = await asyncpg.create_pool(settings.dsn, min_size=1, max_size=2)
    try:
        dying = ReloadProcessor(short_lease, pool, Metrics())
        [request] = await dying.claim(1)
        method = await dying.gateway.default_payment_method(cus)
        assert method is not None
        await dying.gateway.charge(
            reload_id=str(request["reload_id"]), stripe_customer=cus, payment_method=method,
            amount=request["price"], currency=request["currency"], customer_ref="c1",
        )  # fmt: skip
        await dying.gateway.close()
        # ... and the process dies here: the request stays 'charging' until its lease ends.
    finally:
        await pool.close()
    assert [r["status"] for r in await reloads(settings)] == ["charging"]
    await asyncio.sleep(0.6)
    async with running_worker(short_lease, "reloads"):

        async def granted() -> bool:
            return bool(
                await fetchval(settings, "SELECT count(*) FROM grants WHERE source = 'auto_reload'")
            )

        await wait_for(granted, what="the grant")
    intents = await intents_of(settings, cus)
    assert len(intents) == 1
    assert [
        (r["status"], r["payment_intent_id"], r["attempts"]) for r in await reloads(settings)
    ] == [("succeeded", intents[0].id, 2)]
    assert (
        await fetchval(settings, "SELECT balance FROM customers WHERE customer_ref = 'c1'")
        == 700 + 5_000
    )


async def test_declines_fail_and_three_in_a_row_disable(settings: Settings) -> None:
    await setup_pipeline(settings, partitions=1)
    cus = await stripe_customer(settings, DECLINED_CARD)
    configure(settings, "c1", cus)
    async with running_worker(fast(settings)) as process:
        await produce(settings, settings.topic_usage, [record(grant("c1", "g0", 1_200))])
        for n in range(4):  # each usage leaves the balance below the threshold again
            await produce(
                settings, settings.topic_usage, [record(usage("c1", f"u{n}", 100 if n else 300))]
            )
            await wait_for(functools.partial(ingest_done, process, n + 2), what=f"usage {n}")

            async def settled(n: int = n) -> bool:
                return bool(await fetchval(
                    settings, "SELECT count(*) >= $1 AND bool_and(status = 'failed') FROM reload_requests",
                    min(n + 1, 3),
                ))  # fmt: skip

            await wait_for(settled, what=f"failure {n + 1}")
        await wait_for(functools.partial(outbox_empty, settings), what="alerts published")
    rows = await reloads(settings)
    assert [(r["status"], r["stripe_code"]) for r in rows] == [("failed", "card_declined")] * 3
    assert (
        await fetchval(
            settings, "SELECT auto_reload_enabled FROM customers WHERE customer_ref = 'c1'"
        )
        is False
    )
    alerts = [
        a
        for a in await alerts_on_topic(settings, expected=5)
        if a["type"].startswith("auto_reload")
    ]
    assert [a["type"] for a in alerts] == ["auto_reload_failed"] * 3 + ["auto_reload_disabled"]
    assert alerts[0]["detail"]["stripe_code"] == "card_declined"


async def test_stripe_down_means_retries_not_failures(settings: Settings, stack: Stack) -> None:
    if stack.local is None:
        pytest.skip("needs the embedded Stripe stand-in to pause it")
    await setup_pipeline(settings, partitions=1)
    cus = await stripe_customer(settings, GOOD_CARD)
    configure(settings, "c1", cus)
    patient = fast(settings).model_copy(update={"stripe_timeout_s": 1.0})
    stand_in = stack.local.stripe
    async with running_worker(patient) as process:
        stand_in.pause()
        try:
            await produce(
                settings,
                settings.topic_usage,
                [record(grant("c1", "g0", 1_200)), record(usage("c1", "u1", 500))],
            )
            await wait_for(functools.partial(ingest_done, process, 2), what="usage")
            await asyncio.sleep(4)  # several timed-out tries
            assert [r["status"] for r in await reloads(settings)] == ["charging"]
            retries = process.metrics.registry.get_sample_value(
                "chargeline_retries_total", {"component": "stripe"}
            )
            assert retries and retries >= 2
        finally:
            stand_in.resume()

        async def done() -> bool:
            return bool(
                await fetchval(
                    settings, "SELECT count(*) FROM reload_requests WHERE status = 'succeeded'"
                )
            )

        await wait_for(done, what="the reload after the stand-in came back")
    print(
        f"stand-in paused 4 s; {retries:.0f} Stripe retries; then {len(await intents_of(settings, cus))} PaymentIntent(s)"
    )
    assert len(await intents_of(settings, cus)) <= 2  # a timed-out create may have charged; ...
    assert [r["status"] for r in await reloads(settings)] == ["succeeded"]
    assert await fetchval(settings, "SELECT count(*) FROM grants WHERE source = 'auto_reload'") == 1


async def test_manual_topup_in_zero_and_three_decimal_currencies(settings: Settings) -> None:
    cus = await stripe_customer(settings, GOOD_CARD)
    configure(settings, "c1", cus)
    for tokens, price, currency, basis in (
        (100, 1_000, "JPY", "10"),
        (1_000, 10_000, "KWD", "0.01"),
    ):
        done = cli(settings, "credits", "topup", "c1", "--tokens", str(tokens), "--price", str(price),
                   "--currency", currency, "--format", "json")  # fmt: skip
        assert done.returncode == 0, done.stderr
        shown = orjson.loads(done.stdout)
        assert (shown["status"], shown["kind"]) == ("succeeded", "manual")
        [intent] = [
            i for i in await intents_of(settings, cus) if i.id == shown["payment_intent_id"]
        ]
        assert (intent.amount, intent.currency) == (price, currency.lower())
        assert cost_basis(price, currency, tokens) == Decimal(basis)
    assert (
        await fetchval(settings, "SELECT balance FROM customers WHERE customer_ref = 'c1'") == 1_100
    )
    declined = await stripe_customer(settings, DECLINED_CARD)
    configure(settings, "c2", declined)
    done = cli(
        settings, "credits", "topup", "c2", "--tokens", "10", "--price", "100", "--currency", "EUR"
    )
    assert (
        done.returncode == 1
        and "card_declined" in done.stderr
        and len(done.stderr.strip().splitlines()) == 1
    )


async def test_no_card_data_or_secret_in_logs_or_tables(settings: Settings) -> None:
    await setup_pipeline(settings, partitions=1)
    cus = await stripe_customer(settings, GOOD_CARD)
    configure(settings, "c1", cus)
    captured = io.StringIO()
    secret_settings = fast(settings).model_copy(update={"log_level": "debug"})
    with redirect_stderr(captured):
        from workers.logs import configure_logging

        configure_logging("debug", "json")
        logging.getLogger().handlers[0].setStream(captured)  # type: ignore[attr-defined]
        async with running_worker(secret_settings) as process:
            await produce(
                settings,
                settings.topic_usage,
                [record(grant("c1", "g0", 1_200)), record(usage("c1", "u1", 500))],
            )
            await wait_for(functools.partial(ingest_done, process, 2), what="usage")

            async def done() -> bool:
                return bool(
                    await fetchval(
                        settings, "SELECT count(*) FROM reload_requests WHERE status = 'succeeded'"
                    )
                )

            await wait_for(done, what="reload")
        configure_logging("info", "console")
    logs = captured.getvalue()
    conn = await asyncpg.connect(settings.dsn)
    try:
        tables = [
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        ]
        dump = "".join([str(await conn.fetch(f'SELECT * FROM "{t}"')) for t in tables])
    finally:
        await conn.close()
    key = settings.stripe_api_key.get_secret_value()
    for haystack, where in ((logs, "logs"), (dump, "tables")):
        for needle in (GOOD_CARD, GOOD_CARD[-4:] + '"', "cvc", key):
            assert needle not in haystack, f"{needle!r} found in {where}"
    assert "reload_succeeded" in logs


async def test_a_reload_no_grant_can_carry_is_refused_before_any_charge(
    settings: Settings,
) -> None:
    """Tokens or a price beyond an event's bounds (10^12) once charged the card, then failed
    to build the grant, and crashed the worker on every retry. The command line refuses
    them in one line; a reload stored so by an earlier version fails, uncharged."""
    cus = await stripe_customer(settings, GOOD_CARD)
    configure(settings, "c1", cus)
    for flag, value in (("--tokens", "1000000000001"), ("--price", "100000000000000")):
        args = {"--tokens": "5", "--price": "100", flag: value}
        done = cli(settings, "credits", "topup", "c1", "--tokens", args["--tokens"],
                   "--price", args["--price"], "--currency", "EUR")  # fmt: skip
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    done = cli(settings, "customers", "configure", "c1", "--reload-tokens", "10000000000000")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    # The largest price for one token, in a currency without minor units: a cost basis of
    # thirteen digits, computed without losing precision.
    assert cost_basis(10**12, "JPY", 1) == Decimal(10**12)
    # A reload stored out of range (as an earlier version let it be).
    await fetchval(settings, "UPDATE customers SET reload_tokens = 10000000000000"
                             " WHERE customer_ref = 'c1' RETURNING 1")  # fmt: skip
    await produce(settings, settings.topic_usage,
                  [record(grant("c1", "g1", 1_200)), record(usage("c1", "u1", 300))])  # fmt: skip
    async with running_worker(fast(settings), "usage", "reloads") as process:
        await wait_for(functools.partial(ingest_done, process, 2), what="2 records")

        async def failed() -> bool:
            return [r["status"] for r in await reloads(settings)][:1] == ["failed"]

        await wait_for(failed, what="the reload failed")
        # The worker goes on (a crash would end the block with its exception).
        await produce(settings, settings.topic_usage, [record(usage("c1", "u2", 1))])
        await wait_for(functools.partial(ingest_done, process, 3), what="the next record")
    # Each crossing's reload (the next record crossed again) failed, none charged.
    assert {(r["status"], r["stripe_code"], r["payment_intent_id"]) for r in await reloads(settings)
            if r["status"] != "requested"} == {("failed", "invalid_reload", None)}  # fmt: skip
    assert await intents_of(settings, cus) == []  # never charged
    assert await fetchval(settings, "SELECT balance FROM customers WHERE customer_ref='c1'") == 899
