"""The HTTP API's admin and billing calls against a real server, real Postgres and the Stripe
stand-in (localstripe): flows created, paused and resumed (scope admin); auto-reload set as
``customers configure`` sets it; top-ups charged through the reloads worker, granted once per
Idempotency-Key even when the same request arrives five times at once, declines answered
402 with Stripe's code, and a top-up Stripe has not answered yet answered 202."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import asyncpg

from tests.support import (
    api_server,
    assert_invariants,
    call,
    fetch,
    fetchval,
    intents_of,
    running_worker,
    stripe_customer,
)
from workers import db
from workers.api import keys
from workers.settings import Settings

GOOD_CARD = "4242424242424242"
DECLINED_CARD = "4000000000000341"  # attaches, declined when charged
TOPUP = "{}/v1/customers/{}/credits/topup".format
AUTO_RELOAD = "{}/v1/customers/{}/credits/auto-reload".format


# --- helpers (minimal; tests/support.py has the shared ones) ---------------------------------


async def api_key(settings: Settings, *scopes: str) -> str:
    """A new key with ``scopes``, written as `chargeline api-keys create` writes it (without
    a subprocess)."""
    new = keys.new_key()
    conn = await asyncpg.connect(settings.dsn)
    try:
        await conn.execute(
            db.QUERIES["api_key_create"], "test", new.prefix, new.lookup, new.digest, list(scopes)
        )
    finally:
        await conn.close()
    return new.key


async def link_stripe(settings: Settings, customer: str, stripe_id: str | None) -> None:
    """`chargeline customers configure CUSTOMER --stripe-customer ID`, nothing else (None:
    the customer's row, without a Stripe customer)."""
    conn = await asyncpg.connect(settings.dsn)
    try:
        await conn.execute(db.QUERIES["customer_configure"], customer, stripe_id, *[None] * 6)
    finally:
        await conn.close()


def fast(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"reload_interval_s": 0.1, "retry_initial_ms": 50, "retry_max_ms": 500}
    )


def replayed(headers: Any) -> bool:
    """Whether the answer was a stored one (``call`` types headers loosely)."""
    return bool(headers.get("Idempotent-Replayed") == "true")


def keyed(idempotency_key: str, **more: str) -> dict[str, str]:
    return {"Idempotency-Key": idempotency_key, **more}


# --- flows --------------------------------------------------------------------------------------


async def test_flows_are_created_paused_and_resumed_with_the_admin_scope(
    settings: Settings,
) -> None:
    admin = await api_key(settings, "admin", "ingest")
    reader = await api_key(settings, "read")
    flow = {"flow_id": "flow_img", "name": "Image generation", "payee_ref": "studio"}
    charge = {"amount": 100, "currency": "EUR", "customer_ref": "c1", "reference": "r1"}
    async with api_server(settings) as base, aiohttp.ClientSession() as session:
        flows, pause = f"{base}/v1/flows", f"{base}/v1/flows/flow_img/pause"
        for method, url in (("POST", flows), ("POST", pause)):
            status, doc, _ = await call(session, method, url, key=reader, body=flow)
            assert (status, doc["error"]["code"]) == (403, "insufficient_scope"), url

        status, doc, _ = await call(session, "POST", flows, key=admin, body=flow)
        assert status == 201, doc
        assert {k: doc["data"][k] for k in ("flow_id", "name", "payee_ref", "status")} == {
            **flow,
            "status": "active",
        }
        assert doc["data"]["charge_count"] == 0
        status, doc, _ = await call(session, "POST", flows, key=admin, body=flow)
        assert (status, doc["error"]["code"]) == (409, "flow_exists"), doc
        status, doc, _ = await call(
            session, "POST", flows, key=admin, body={"flow_id": "flow_txt", "name": "Text"}
        )
        assert status == 201 and doc["data"]["payee_ref"] == "default", doc

        for _ in range(2):  # pausing a paused flow changes nothing
            status, doc, _ = await call(session, "POST", pause, key=admin)
            assert status == 200 and doc["data"]["status"] == "paused", doc
        status, doc, _ = await call(session, "GET", f"{base}/v1/flows/flow_img", key=reader)
        assert status == 200 and doc["data"]["status"] == "paused"
        status, doc, _ = await call(  # this process's flow cache saw the pause at once
            session, "POST", f"{base}/v1/flows/flow_img/charges", key=admin, body=charge
        )
        assert (status, doc["error"]["code"]) == (409, "flow_paused"), doc
        status, doc, _ = await call(session, "POST", f"{base}/v1/flows/flow_img/resume", key=admin)
        assert status == 200 and doc["data"]["status"] == "active", doc

        bad: list[tuple[str, str, dict[str, Any], int, str, str | None]] = [
            ("POST", flows, {"flow_id": "a\tb", "name": "x"}, 422, "invalid_request", "flow_id"),
            ("POST", flows, {"flow_id": "x" * 201, "name": "x"}, 422, "invalid_request",
             "flow_id"),
            ("POST", flows, {"flow_id": "f"}, 422, "invalid_request", "name"),
            ("POST", flows, {"flow_id": "f", "name": "x", "payee": "p"}, 422, "invalid_request",
             "payee"),
            ("POST", flows, {"flow_id": 5, "name": "x"}, 422, "invalid_request", "flow_id"),
            ("POST", f"{base}/v1/flows/nope/pause", {}, 404, "unknown_flow", "flow_id"),
            ("POST", f"{base}/v1/flows/nope/resume", {}, 404, "unknown_flow", "flow_id"),
            ("POST", f"{base}/v1/flows/a%09b/pause", {}, 422, "invalid_request", "flow_id"),
        ]  # fmt: skip
        for method, url, body, want_status, want_code, want_param in bad:
            status, doc, _ = await call(session, method, url, key=admin, body=body or None)
            assert (status, doc["error"]["code"], doc["error"].get("param")) == (
                want_status,
                want_code,
                want_param,
            ), (url, body, doc)
        status, doc, _ = await call(session, "POST", flows, key=admin, data=b'{"flow_id": ')
        assert (status, doc["error"]["code"]) == (400, "invalid_json")
    rows = await fetch(settings, "SELECT flow_id, name, payee_ref, status FROM flows ORDER BY 1")
    assert [tuple(r) for r in rows] == [
        ("flow_img", "Image generation", "studio", "active"),
        ("flow_txt", "Text", "default", "active"),
    ]


# --- auto-reload --------------------------------------------------------------------------------


async def test_auto_reload_is_set_with_the_rules_of_customers_configure(
    settings: Settings,
) -> None:
    billing = await api_key(settings, "billing")
    reader = await api_key(settings, "read")
    full = {"enabled": True, "threshold": 1000, "tokens": 5000, "price": 500, "currency": "eur"}
    settings_of = "SELECT auto_reload_enabled, reload_threshold, reload_tokens, reload_price, \
        reload_currency FROM customers WHERE customer_ref = 'c1'"
    async with api_server(settings) as base, aiohttp.ClientSession() as session:
        url = AUTO_RELOAD(base, "c1")
        status, doc, _ = await call(session, "PUT", url, key=reader, body=full)
        assert (status, doc["error"]["code"]) == (403, "insufficient_scope")

        # No Stripe customer yet: refused, and nothing written (not even the customer).
        status, doc, _ = await call(session, "PUT", url, key=billing, body=full)
        assert (status, doc["error"]["code"], doc["error"]["param"]) == (
            422,
            "auto_reload_incomplete",
            "stripe_customer",
        ), doc
        assert "Stripe customer" in doc["error"]["message"]
        assert await fetchval(settings, "SELECT count(*) FROM customers") == 0

        await link_stripe(settings, "c1", "cus_test_c1")
        partial = {"enabled": True, "threshold": 1000}
        status, doc, _ = await call(session, "PUT", url, key=billing, body=partial)
        assert (status, doc["error"]["code"]) == (422, "auto_reload_incomplete"), doc
        assert "tokens, price, currency; nothing changed" in doc["error"]["message"]
        assert tuple((await fetch(settings, settings_of))[0]) == (False, None, None, None, None)

        status, doc, _ = await call(session, "PUT", url, key=billing, body=full)
        want = {"customer_ref": "c1", "enabled": True, "threshold": 1000, "tokens": 5000,
                "price": 500, "currency": "EUR"}  # fmt: skip
        assert status == 200 and doc["data"] == want, doc
        status, doc, _ = await call(session, "PUT", url, key=billing, body={"enabled": False})
        assert status == 200 and doc["data"] == {**want, "enabled": False}, doc
        status, doc, _ = await call(  # absent and null fields keep their values
            session, "PUT", url, key=billing, body={"enabled": True, "tokens": None, "price": 900}
        )
        assert status == 200 and doc["data"] == {**want, "price": 900}, doc

        for body, param in (
            ({"enabled": True, "threshold": -1}, "threshold"),
            ({"enabled": "yes"}, "enabled"),
            ({"threshold": 5}, "enabled"),
            ({"enabled": True, "price": 1.5}, "price"),
            ({"enabled": True, "currency": "XXX"}, "currency"),
            ({"enabled": True, "stripe_customer": "cus_x"}, "stripe_customer"),
        ):
            status, doc, _ = await call(session, "PUT", url, key=billing, body=body)
            assert (status, doc["error"]["code"], doc["error"]["param"]) == (
                422,
                "invalid_request",
                param,
            ), (body, doc)
    assert tuple((await fetch(settings, settings_of))[0]) == (True, 1000, 5000, 900, "EUR")


# --- top-ups ------------------------------------------------------------------------------------


async def test_a_topup_is_granted_or_declined_through_the_reloads_worker(
    settings: Settings,
) -> None:
    good = await stripe_customer(settings, GOOD_CARD)
    declined = await stripe_customer(settings, DECLINED_CARD)
    await link_stripe(settings, "c1", good)
    await link_stripe(settings, "c2", declined)
    await link_stripe(settings, "c3", None)
    billing = await api_key(settings, "billing")
    reader = await api_key(settings, "read")
    body = {"tokens": 500, "price": 1000, "currency": "EUR"}
    async with (
        api_server(settings) as base,
        aiohttp.ClientSession() as session,
        running_worker(fast(settings), "reloads"),
    ):
        refused: list[tuple[str, str, dict[str, Any], dict[str, str], int, str]] = [
            ("c1", reader, body, keyed("k0"), 403, "insufficient_scope"),
            ("c1", billing, body, {}, 400, "idempotency_key_missing"),
            ("c1", billing, body, keyed(" "), 400, "idempotency_key_missing"),
            ("c1", billing, body, keyed("k" * 256), 400, "idempotency_key_invalid"),
            ("c1", billing, {**body, "tokens": 0}, keyed("k0"), 422, "invalid_request"),
            ("c1", billing, {**body, "currency": "XTS"}, keyed("k0"), 422, "invalid_request"),
            ("c1", billing, {"tokens": 5, "price": 5}, keyed("k0"), 422, "invalid_request"),
            ("nobody", billing, body, keyed("k0"), 422, "no_stripe_customer"),
            ("c3", billing, body, keyed("k0"), 422, "no_stripe_customer"),
        ]  # fmt: skip
        for customer, key, sent, headers, want_status, want_code in refused:
            status, doc, _ = await call(
                session, "POST", TOPUP(base, customer), key=key, body=sent, headers=headers
            )
            assert (status, doc["error"]["code"]) == (want_status, want_code), (sent, doc)
        # None of those kept its key or asked for a charge.
        assert await fetchval(settings, "SELECT count(*) FROM idempotency_keys") == 0
        assert await fetchval(settings, "SELECT count(*) FROM reload_requests") == 0

        status, doc, _ = await call(
            session, "POST", TOPUP(base, "c1"), key=billing, body=body, headers=keyed("k0")
        )
        assert status == 200, doc
        granted = doc["data"]
        assert {k: granted[k] for k in ("balance", "topped_up", "currency", "status")} == {
            "balance": 500,
            "topped_up": 500,
            "currency": "EUR",
            "status": "succeeded",
        }
        assert granted["payment_id"].startswith("pi_") and granted["topup_id"]

        status, doc, _ = await call(
            session, "POST", TOPUP(base, "c2"), key=billing, body=body, headers=keyed("k1")
        )
        assert (status, doc["error"]["code"], doc["error"]["type"]) == (
            402,
            "card_declined",
            "payment_error",
        ), doc
        status, again, answered = await call(
            session, "POST", TOPUP(base, "c2"), key=billing, body=body, headers=keyed("k1")
        )
        assert (status, again["error"]) == (402, doc["error"])
        assert replayed(answered)

    [intent] = await intents_of(settings, good)
    assert (intent.id, intent.amount, intent.currency, intent.status) == (
        granted["payment_id"],
        1000,
        "eur",
        "succeeded",
    )
    grants = await fetch(settings, "SELECT customer_ref, reference, tokens, source FROM grants")
    assert [tuple(g) for g in grants] == [("c1", granted["payment_id"], 500, "manual")]
    requests = await fetch(
        settings,
        "SELECT reload_id::text, customer_ref, kind, status, stripe_code FROM reload_requests "
        "ORDER BY customer_ref",
    )
    assert [tuple(r) for r in requests] == [
        (granted["topup_id"], "c1", "manual", "succeeded", None),
        (requests[1]["reload_id"], "c2", "manual", "failed", "card_declined"),
    ]
    assert (
        await fetchval(settings, "SELECT balance FROM customers WHERE customer_ref = 'c1'") == 500
    )
    await assert_invariants(settings)


async def test_one_idempotency_key_charges_once_and_answers_alike(settings: Settings) -> None:
    good = await stripe_customer(settings, GOOD_CARD)
    await link_stripe(settings, "c1", good)
    billing = await api_key(settings, "billing")
    five = {"tokens": 300, "price": 600, "currency": "EUR"}
    late = {"tokens": 200, "price": 700, "currency": "EUR"}
    async with api_server(settings) as base, aiohttp.ClientSession() as session:
        url = TOPUP(base, "c1")
        # No reloads worker yet: Stripe is not asked, so the answer is 202 with the top-up id.
        status, pending, _ = await call(
            session, "POST", url, key=billing, body=late, headers=keyed("k-late", Prefer="wait=1")
        )
        assert status == 202 and pending["data"]["status"] == "pending", pending
        assert await fetchval(settings, "SELECT count(*) FROM reload_requests") == 1

        async with running_worker(fast(settings), "reloads"):
            answers = await asyncio.gather(
                *(
                    call(session, "POST", url, key=billing, body=five, headers=keyed("k-five"))
                    for _ in range(5)
                )
            )
            assert [status for status, _, _ in answers] == [200] * 5, answers
            datas = [doc["data"] for _, doc, _ in answers]
            assert all(data == datas[0] for data in datas), datas
            assert datas[0]["topped_up"] == 300 and datas[0]["payment_id"].startswith("pi_")

            status, doc, _ = await call(
                session, "POST", url, key=billing, body={**five, "tokens": 301},
                headers=keyed("k-five"),
            )  # fmt: skip
            assert (status, doc["error"]["code"]) == (409, "idempotency_key_reused"), doc
            status, doc, _ = await call(  # another customer is another request too
                session, "POST", TOPUP(base, "c9"), key=billing, body=five,
                headers=keyed("k-five"),
            )  # fmt: skip
            assert (status, doc["error"]["code"]) == (409, "idempotency_key_reused"), doc
            status, doc, answered = await call(
                session, "POST", url, key=billing, body=five, headers=keyed("k-five")
            )
            assert (status, doc["data"]) == (200, datas[0])
            assert replayed(answered)

            # The request Stripe had not answered: the same request now gives the outcome.
            status, doc, _ = await call(
                session, "POST", url, key=billing, body=late, headers=keyed("k-late")
            )
            assert status == 200, doc
            assert doc["data"]["topup_id"] == pending["data"]["topup_id"]
            assert doc["data"]["topped_up"] == 200

    intents = await intents_of(settings, good)
    assert sorted((i.amount, i.status) for i in intents) == [(600, "succeeded"), (700, "succeeded")]
    grants = await fetch(settings, "SELECT reference, tokens, source FROM grants ORDER BY tokens")
    assert [(g["tokens"], g["source"]) for g in grants] == [(200, "manual"), (300, "manual")]
    assert grants[1]["reference"] == datas[0]["payment_id"]
    assert await fetchval(settings, "SELECT count(*) FROM reload_requests") == 2
    assert await fetchval(settings, "SELECT count(*) FROM idempotency_keys") == 2
    assert (
        await fetchval(settings, "SELECT balance FROM customers WHERE customer_ref = 'c1'") == 500
    )
    await assert_invariants(settings)
