"""Stripe's side, end to end against the Stripe stand-in and a real API and worker: a card
collected with payment-setup and confirmed through the stripe library, made the default by
a signed ``setup_intent.succeeded``, then charged by an auto-reload; bad, stale and replayed
webhooks change nothing; a reload whose card wants 3-D Secure is failed, never granted; a
reload left open is settled from its PaymentIntent's event, granted once."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
from pydantic import SecretStr

from tests.support import (
    api_server,
    assert_invariants,
    call,
    cli,
    fetch,
    fetchval,
    grant,
    ingest_done,
    intents_of,
    new_key,
    produce,
    record,
    running_worker,
    setup_pipeline,
    stripe_client,
    stripe_customer,
    usage,
    wait_for,
)
from workers.jobs.reloads import ReloadProcessor
from workers.metrics import Metrics
from workers.settings import Settings

SECRET = "whsec_chargeline_test"  # noqa: S105 -- the test endpoint's, not a real one
GOOD_CARD = "4242424242424242"
THREE_D_SECURE_CARD = "4000002760003184"  # Stripe's: authentication on every payment


def webhooks(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"stripe_webhook_secret": SecretStr(SECRET), "reload_interval_s": 0.1,
                "retry_initial_ms": 50, "retry_max_ms": 500}
    )  # fmt: skip


def signed(
    event: dict[str, Any], *, secret: str = SECRET, at: int | None = None
) -> tuple[bytes, dict[str, str]]:
    """The body and the ``Stripe-Signature`` header Stripe would send, by Stripe's published
    scheme: ``t=TIMESTAMP,v1=hex(HMAC-SHA256(secret, "TIMESTAMP.BODY"))``."""
    body = orjson.dumps(event)
    stamp = int(time.time()) if at is None else at
    mac = hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return body, {"Stripe-Signature": f"t={stamp},v1={mac}", "Content-Type": "application/json"}


def event(kind: str, obj: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
    return {"id": event_id or f"evt_{uuid.uuid4().hex[:24]}", "object": "event", "type": kind,
            "created": int(time.time()), "data": {"object": obj}}  # fmt: skip


async def post_event(
    session: aiohttp.ClientSession, base: str, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    async with session.post(f"{base}/v1/stripe/webhooks", data=body, headers=headers) as response:
        return response.status, orjson.loads(await response.read())


async def handled(settings: Settings, event_id: str) -> bool:
    return bool(
        await fetchval(
            settings,
            "SELECT handled_at IS NOT NULL FROM stripe_events WHERE event_id = $1",
            event_id,
        )
    )


async def test_a_card_set_up_through_the_api_is_charged_by_a_later_reload(
    settings: Settings,
) -> None:
    settings = webhooks(settings)
    await setup_pipeline(settings, partitions=1)
    key = new_key(settings, "billing", "read")["key"]
    async with (
        api_server(settings) as base,
        aiohttp.ClientSession() as session,
        stand_in_sends_webhooks(settings, f"{base}/v1/stripe/webhooks", ["customer.created"]),
    ):
        status, doc, _ = await call(
            session, "POST", f"{base}/v1/customers/c1/payment-setup", key=key
        )
        assert status == 200, doc
        setup = doc["data"]

        async def created_event_recorded() -> bool:  # signed and sent by the stand-in itself
            return bool(
                await fetchval(
                    settings, "SELECT count(*) FROM stripe_events WHERE type = 'customer.created'"
                )
            )

        await wait_for(created_event_recorded, what="the stand-in's customer.created")
        assert setup["customer_ref"] == "c1"
        assert setup["stripe_customer"].startswith("cus_")
        assert setup["setup_intent"].startswith("seti_")
        assert setup["client_secret"].startswith(setup["setup_intent"])
        # The browser's part (stripe.confirmSetup), done with the stripe library.
        async with stripe_client(settings) as client:
            method = await client.v1.payment_methods.create_async(
                {"type": "card",
                 "card": {"number": GOOD_CARD, "exp_month": 12, "exp_year": 2031, "cvc": "123"}}
            )  # fmt: skip
            intent = await client.v1.setup_intents.confirm_async(
                setup["setup_intent"], {"payment_method": method.id}
            )
            assert intent.status == "succeeded"
        status, shown, _ = await call(session, "GET", f"{base}/v1/customers/c1/credits", key=key)
        assert status == 200 and shown["data"]["payment_method"] is None

        succeeded = event("setup_intent.succeeded", intent.to_dict())
        status, answer = await post_event(session, base, *signed(succeeded))
        assert status == 200, answer
        assert answer["data"] == {"event_id": succeeded["id"], "type": "setup_intent.succeeded",
                                  "duplicate": False}  # fmt: skip
        async with running_worker(settings, "reloads"):
            await wait_for(functools.partial(handled, settings, succeeded["id"]), what="handled")
        status, shown, _ = await call(session, "GET", f"{base}/v1/customers/c1/credits", key=key)
        assert shown["data"]["payment_method"] == {"type": "card", "brand": "visa",
                                                   "last4": "4242"}  # fmt: skip
        # The same event again: answered, nothing more.
        status, again = await post_event(session, base, *signed(succeeded))
        assert status == 200 and again["data"]["duplicate"] is True
        status, doc, _ = await call(
            session, "PUT", f"{base}/v1/customers/c1/credits/auto-reload", key=key,
            body={"enabled": True, "threshold": 1000, "tokens": 5000, "price": 500,
                  "currency": "EUR"},
        )  # fmt: skip
        assert status == 200, doc

    async with stripe_client(settings) as client:
        customer = (await client.v1.customers.retrieve_async(setup["stripe_customer"])).to_dict()
        assert customer["invoice_settings"]["default_payment_method"] == method.id
        assert customer["metadata"]["customer_ref"] == "c1"
    async with running_worker(settings) as process:
        await produce(
            settings, settings.topic_usage,
            [record(grant("c1", "g0", 1_200)), record(usage("c1", "u1", 500))],
        )  # fmt: skip
        await wait_for(functools.partial(ingest_done, process, 2), what="usage")

        async def reloaded() -> bool:
            return bool(
                await fetchval(
                    settings, "SELECT count(*) FROM reload_requests WHERE status = 'succeeded'"
                )
            )

        await wait_for(reloaded, what="the reload")
    intents = await intents_of(settings, setup["stripe_customer"])
    assert [(i.amount, i.status, i.payment_method) for i in intents] == [
        (500, "succeeded", method.id)
    ]
    assert await fetchval(settings, "SELECT count(*) FROM grants WHERE source = 'auto_reload'") == 1
    stored = await fetch(
        settings,
        "SELECT type, object_id, outcome, data::text AS data FROM stripe_events "
        "ORDER BY received_at",
    )
    assert [(row["type"], row["object_id"], row["outcome"]) for row in stored] == [
        ("customer.created", setup["stripe_customer"], "linked"),
        ("setup_intent.succeeded", setup["setup_intent"], "default_payment_method_set"),
    ]
    assert all(setup["client_secret"] not in row["data"] for row in stored)
    await assert_invariants(settings)


async def test_bad_stale_and_replayed_webhooks_change_nothing(settings: Settings) -> None:
    settings = webhooks(settings)
    await setup_pipeline(settings, partitions=1)
    cus = await stripe_customer(settings, GOOD_CARD)
    done = cli(settings, "customers", "configure", "c1", "--stripe-customer", cus,
               "--auto-reload", "on", "--reload-threshold", "10", "--reload-tokens", "100",
               "--reload-price", "100", "--currency", "EUR")  # fmt: skip
    assert done.returncode == 0, done.stderr
    deleted = event("customer.deleted", {"id": cus, "object": "customer", "deleted": True})
    async with api_server(settings) as base, aiohttp.ClientSession() as session:
        body, headers = signed(deleted, secret="whsec_someone_else")  # noqa: S106
        assert (await post_event(session, base, body, headers))[0] == 400
        body, headers = signed(deleted, at=int(time.time()) - 600)  # past the 5 minutes
        status, answer = await post_event(session, base, body, headers)
        assert (status, answer["error"]["code"]) == (400, "invalid_signature")
        body, headers = signed(deleted, at=int(time.time()) + 600)  # signed for a time to come
        status, answer = await post_event(session, base, body, headers)
        assert (status, answer["error"]["code"]) == (400, "invalid_signature")
        status, answer = await post_event(session, base, body, {"Content-Type": "application/json"})
        assert (status, answer["error"]["code"]) == (400, "invalid_signature")
        body, headers = signed(deleted)
        status, answer = await post_event(
            session, base, body + b" ", headers
        )  # not what was signed
        assert status == 400
        assert await fetchval(settings, "SELECT count(*) FROM stripe_events") == 0

        status, answer = await post_event(session, base, *signed(deleted))
        assert status == 200 and answer["data"]["duplicate"] is False
        async with running_worker(settings, "reloads"):
            await wait_for(functools.partial(handled, settings, deleted["id"]), what="handled")
        row = (await fetch(settings, "SELECT * FROM customers WHERE customer_ref = 'c1'"))[0]
        assert (row["auto_reload_enabled"], row["stripe_customer_id"]) == (False, None)
        # Turned back on by hand; a replay of the same event id (even re-signed, with
        # another body) is answered and does nothing.
        done = cli(settings, "customers", "configure", "c1", "--stripe-customer", cus,
                   "--auto-reload", "on")  # fmt: skip
        assert done.returncode == 0, done.stderr
        replay = {**deleted, "data": {"object": {"id": cus, "object": "customer"}}}
        status, answer = await post_event(session, base, *signed(replay))
        assert status == 200 and answer["data"]["duplicate"] is True
        async with running_worker(settings, "reloads"):
            await wait_for(functools.partial(handled, settings, deleted["id"]), what="handled")
    assert await fetchval(settings, "SELECT count(*) FROM stripe_events") == 1
    row = (await fetch(settings, "SELECT * FROM customers WHERE customer_ref = 'c1'"))[0]
    assert (row["auto_reload_enabled"], row["stripe_customer_id"]) == (True, cus)


async def test_a_reload_whose_card_wants_authentication_fails_and_grants_nothing(
    settings: Settings,
) -> None:
    settings = webhooks(settings)
    await setup_pipeline(settings, partitions=1)
    cus = await stripe_customer(settings, THREE_D_SECURE_CARD)
    done = cli(settings, "customers", "configure", "c1", "--stripe-customer", cus,
               "--auto-reload", "on", "--reload-threshold", "1000", "--reload-tokens", "5000",
               "--reload-price", "500", "--currency", "EUR")  # fmt: skip
    assert done.returncode == 0, done.stderr
    async with running_worker(settings) as process:
        await produce(
            settings, settings.topic_usage,
            [record(grant("c1", "g0", 1_200)), record(usage("c1", "u1", 500))],
        )  # fmt: skip
        await wait_for(functools.partial(ingest_done, process, 2), what="usage")

        async def failed() -> bool:
            return bool(
                await fetchval(
                    settings, "SELECT count(*) FROM reload_requests WHERE status = 'failed'"
                )
            )

        await wait_for(failed, what="the reload's failure")
    rows = await fetch(
        settings, "SELECT status, stripe_code, payment_intent_id FROM reload_requests"
    )
    assert [(r["status"], r["stripe_code"]) for r in rows] == [
        ("failed", "authentication_required")
    ]
    intents = await intents_of(settings, cus)
    assert [(i.id, i.status) for i in intents] == [(rows[0]["payment_intent_id"], "canceled")]
    assert await fetchval(settings, "SELECT count(*) FROM grants WHERE source = 'auto_reload'") == 0
    assert await fetchval(settings, "SELECT reload_failures FROM customers") == 1
    await assert_invariants(settings)


async def test_a_reload_left_open_is_settled_from_its_payment_intent_event_once(
    settings: Settings,
) -> None:
    """Stripe charged, and the answer never reached the worker (it is still waiting, its
    lease held): ``payment_intent.succeeded`` grants the tokens, once, even sent twice."""
    settings = webhooks(settings)
    await setup_pipeline(settings, partitions=1)
    cus = await stripe_customer(settings, GOOD_CARD)
    done = cli(settings, "customers", "configure", "c1", "--stripe-customer", cus)
    assert done.returncode == 0, done.stderr
    reload_id = str(uuid.uuid4())
    conn_settings = settings
    await fetchval(
        conn_settings,
        "INSERT INTO reload_requests (reload_id, customer_ref, kind, tokens, price, currency) "
        "VALUES ($1, 'c1', 'manual', 300, 200, 'EUR') RETURNING reload_id",
        reload_id,
    )
    processor = ReloadProcessor(settings, await _pool(settings), Metrics())
    try:
        claimed = await processor.claim(1, reload_id)
        charged = await processor.gateway.charge(
            reload_id=reload_id, stripe_customer=cus,
            payment_method=str(await processor.gateway.default_payment_method(cus)),
            amount=200, currency="EUR", customer_ref="c1",
        )  # fmt: skip
        assert claimed and charged["status"] == "succeeded"
    finally:
        await processor.gateway.close()
        await processor.pool.close()
    paid = event("payment_intent.succeeded", charged)
    async with (
        api_server(settings) as base,
        aiohttp.ClientSession() as session,
        running_worker(settings, "reloads"),
    ):
        for _ in range(2):
            status, answer = await post_event(session, base, *signed(paid))
            assert status == 200, answer
        await wait_for(functools.partial(handled, settings, paid["id"]), what="handled")
    rows = await fetch(settings, "SELECT status, payment_intent_id FROM reload_requests")
    assert [(r["status"], r["payment_intent_id"]) for r in rows] == [("succeeded", charged["id"])]
    granted = await fetch(settings, "SELECT reference, tokens FROM grants")
    assert [(g["reference"], g["tokens"]) for g in granted] == [(charged["id"], 300)]
    assert await fetchval(settings, "SELECT outcome FROM stripe_events") == "reload_granted"
    assert len(await intents_of(settings, cus)) == 1
    await assert_invariants(settings)


async def test_payment_setup_from_the_command_line(settings: Settings) -> None:
    await setup_pipeline(settings, partitions=1)
    done = cli(settings, "customers", "payment-setup", "c9", "--format", "json")
    assert done.returncode == 0, done.stderr
    started = orjson.loads(done.stdout)
    assert started["setup_intent"].startswith("seti_")
    # Run again: the same Stripe customer, linked once; a new SetupIntent.
    again = orjson.loads(
        cli(settings, "customers", "payment-setup", "c9", "--format", "json").stdout
    )
    assert again["stripe_customer"] == started["stripe_customer"]
    assert again["setup_intent"] != started["setup_intent"]
    assert (
        await fetchval(
            settings, "SELECT stripe_customer_id FROM customers WHERE customer_ref = 'c9'"
        )
        == started["stripe_customer"]
    )
    done = cli(settings, "customers", "payment-setup", "")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr


@contextlib.asynccontextmanager
async def stand_in_sends_webhooks(
    settings: Settings, url: str, events: list[str]
) -> AsyncIterator[None]:
    """The Stripe stand-in signs ``events`` with SECRET and posts them to ``url`` (its
    ``/_config/webhooks``), until the block ends."""
    config = f"{settings.stripe_api_base}/_config/webhooks/chargeline-test"
    async with aiohttp.ClientSession() as session:
        async with session.post(config, json={"url": url, "secret": SECRET, "events": events}):
            pass
        try:
            yield
        finally:
            async with session.post(config, json={"url": url, "secret": SECRET, "events": []}):
                pass


async def _pool(settings: Settings) -> Any:
    from workers import db

    return await db.create_pool(settings.dsn, min_size=1, max_size=2)
