"""The HTTP API's reads against a real server, with data written by the real workers (the
ledger, dead letters) or straight into Postgres (charges by the thousand, payouts cut as
`payouts run` cuts them): each endpoint's shape, a customer with no event read as zero, a
cursor walk over 2,500 charges that sees each once while more arrive, bad parameters
answered 422 in the envelope, and keys and scopes."""

from __future__ import annotations

import asyncio
import base64
import functools
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import asyncpg
import orjson
from openapi_spec_validator import validate

from tests.support import (
    api_server,
    call,
    create_flows,
    fetch,
    fetchval,
    grant,
    ingest_done,
    insert_charges,
    new_key,
    produce,
    record,
    rfc3339,
    running_worker,
    setup_pipeline,
    usage,
    wait_for,
)
from workers import db
from workers.jobs.payouts import cut_payouts
from workers.settings import Settings

NOW = datetime.now(UTC)
THIS_MONTH = NOW.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
CHARGE_FIELDS = {"flow_id", "customer_ref", "reference", "amount", "currency", "status",
                 "metadata", "occurred_at", "recorded_at", "charge_id", "payout_id"}  # fmt: skip
GRANT_FIELDS = {"reference", "tokens", "remaining", "expires_at", "source", "status"}
PAYOUT_FIELDS = {"payout_id", "payee_ref", "currency", "period_start", "period_end",
                 "charge_count", "amount", "status"}  # fmt: skip
DEAD_LETTER_FIELDS = {"id", "reason", "topic", "partition", "offset", "detail", "created_at"}
EMPTY_PAGE = {"cursor": None, "has_more": False}

# alice: a purchase and a plan grant (soonest expiry: pays first), usage this month in
# three features and none, and usage early in 2025 (one stamped +01:00 just after
# midnight, its UTC day the day before). bob: more usage than his one grant holds.
LOAD = [
    grant("alice", "g-year", 1000, expires_at=rfc3339(NOW + timedelta(days=365))),
    grant("alice", "g-plan", 300, cost_basis="0", source="plan",
          expires_at=rfc3339(NOW + timedelta(days=8))),
    usage("alice", "u1", 200, feature="chat", occurred_at=rfc3339(THIS_MONTH)),
    usage("alice", "u2", 100, feature="chat", occurred_at=rfc3339(THIS_MONTH)),
    usage("alice", "u3", 150, feature="images", occurred_at=rfc3339(THIS_MONTH)),
    usage("alice", "u4", 40, occurred_at=rfc3339(THIS_MONTH)),
    usage("alice", "u5", 60, feature="chat", occurred_at="2025-01-05T09:00:00Z"),
    usage("alice", "u6", 30, feature="images", occurred_at="2025-02-01T00:30:00+01:00"),
    grant("bob", "b-1", 50),
    usage("bob", "bu1", 80, feature="chat"),
]  # fmt: skip


def url(base: str, path: str, **params: Any) -> str:
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return f"{base}{path}" + (f"?{query}" if query else "")


async def get(session: aiohttp.ClientSession, key: str, address: str) -> dict[str, Any]:
    """The document of a GET that must succeed."""
    status, doc, _ = await call(session, "GET", address, key=key)
    assert status == 200, (address, doc)
    assert doc["meta"]["request_id"] and doc["meta"]["timestamp"]
    return doc


async def walk(
    session: aiohttp.ClientSession, key: str, base: str, path: str, **params: Any
) -> list[dict[str, Any]]:
    """Every row of a list, page after page."""
    rows: list[dict[str, Any]] = []
    cursor = None
    while True:
        doc = await get(session, key, url(base, path, cursor=cursor, **params))
        page = doc["meta"]["pagination"]
        rows.extend(doc["data"])
        if not page["has_more"]:
            assert page["cursor"] is None
            return rows
        cursor = page["cursor"]


def moment(text: str) -> datetime:
    return datetime.fromisoformat(text)


async def load_ledger(settings: Settings) -> None:
    await setup_pipeline(settings, partitions=1)
    async with running_worker(settings, "usage") as process:
        await produce(settings, settings.topic_usage, [record(e) for e in LOAD])
        await wait_for(functools.partial(ingest_done, process, len(LOAD)), what="the load")
    conn = await asyncpg.connect(settings.dsn)
    try:
        await conn.fetchrow(
            db.QUERIES["customer_configure"], "alice", "cus_alice", True, 100, 1000, 1500,
            "EUR", 50,
        )  # fmt: skip
    finally:
        await conn.close()


async def test_credits_ledger_and_usage_of_a_customer(settings: Settings) -> None:
    await load_ledger(settings)
    key = new_key(settings, "read")["key"]
    async with api_server(settings) as base, aiohttp.ClientSession() as session:
        credits = (await get(session, key, f"{base}/v1/customers/alice/credits"))["data"]
        # Usage this month 490, early 2025 90: 1300 granted, 720 left.
        assert credits["balance"] == 720 and isinstance(credits["balance"], int)
        assert credits["auto_reload"] == {"enabled": True, "threshold": 100, "tokens": 1000,
                                          "price": 1500, "currency": "EUR"}  # fmt: skip
        assert credits["low_balance_threshold"] == 50
        assert credits["payment_method"] is None
        grants = credits["grants"]
        assert [g["reference"] for g in grants] == ["g-year", "g-plan"]  # g-plan used up
        assert all(set(g) >= GRANT_FIELDS for g in grants)
        assert [(g["remaining"], g["status"]) for g in grants] == [(720, "active"), (0, "used")]
        assert (grants[0]["source"], grants[0]["cost_basis"], grants[1]["cost_basis"]) == (
            "purchase", "0.0001", "0"
        )  # fmt: skip
        bought_at = await fetchval(
            settings, "SELECT effective_at FROM grants WHERE reference = 'g-year'"
        )
        assert moment(credits["last_topped_up_at"]) == bought_at  # the purchase, not the plan

        bob = (await get(session, key, f"{base}/v1/customers/bob/credits"))["data"]
        assert (bob["balance"], bob["last_topped_up_at"]) == (-30, bob["grants"][0]["effective_at"])
        assert bob["auto_reload"]["enabled"] is False

        # The ledger, three entries a page, newest first, as Postgres holds it.
        entries = await walk(session, key, base, "/v1/customers/alice/ledger", limit=3)
        expected = await fetch(
            settings,
            "SELECT e.seq, e.kind, e.amount, e.balance_after, g.reference AS grant_reference, "
            "e.reference AS cause_reference, e.created_at FROM ledger_entries e "
            "LEFT JOIN grants g USING (grant_id) WHERE e.customer_ref = 'alice' "
            "ORDER BY e.seq DESC",
        )
        assert len(entries) == len(expected) >= 8
        for entry, row in zip(entries, expected, strict=True):
            assert {**entry, "created_at": moment(entry["created_at"])} == dict(row.items())
        assert entries[0]["balance_after"] == 720
        assert entries[-1] == {**entries[-1], "kind": "grant", "amount": 1000,
                               "grant_reference": "g-year", "cause_reference": "g-year"}  # fmt: skip
        assert {e["cause_reference"] for e in entries if e["kind"] == "usage"} == {
            "u1", "u2", "u3", "u4", "u5", "u6"
        }  # fmt: skip
        first = await get(session, key, url(base, "/v1/customers/alice/ledger", limit=100))
        assert first["meta"]["pagination"] == EMPTY_PAGE
        assert [e["seq"] for e in first["data"]] == [e["seq"] for e in entries]

        # Usage: this month by default, per feature (no feature last).
        used = (await get(session, key, f"{base}/v1/customers/alice/usage"))["data"]
        assert (used["tokens"], used["events"]) == (490, 4)
        assert used["features"] == [
            {"feature": "chat", "tokens": 300, "events": 2},
            {"feature": "images", "tokens": 150, "events": 1},
            {"feature": None, "tokens": 40, "events": 1},
        ]
        assert moment(used["start"]) == THIS_MONTH and moment(used["end"]) > NOW
        early = url(base, "/v1/customers/alice/usage", start="2025-01-01",
                    end="2025-01-31T12:00:00+01:00")  # fmt: skip
        used = (await get(session, key, early))["data"]
        # u6 occurred at 2025-01-31T23:30Z, after the end.
        assert (used["tokens"], used["features"]) == (60, [{"feature": "chat", "tokens": 60,
                                                            "events": 1}])  # fmt: skip

        history = url(base, "/v1/customers/alice/usage/history", start_date="2025-01-01",
                      end_date="2025-02-28")  # fmt: skip
        by_day = (await get(session, key, history))["data"]
        assert (by_day["granularity"], by_day["tokens"], len(by_day["periods"])) == ("day", 90, 59)
        assert by_day["periods"][0]["period_start"] == "2025-01-01"
        used_days = {p["period_start"]: p["features"] for p in by_day["periods"] if p["tokens"]}
        assert used_days == {
            "2025-01-05": [{"feature": "chat", "tokens": 60, "events": 1}],
            "2025-01-31": [{"feature": "images", "tokens": 30, "events": 1}],
        }
        by_month = (await get(session, key, f"{history}&granularity=month"))["data"]
        assert [(p["period_start"], p["tokens"], p["events"]) for p in by_month["periods"]] == [
            ("2025-01-01", 90, 2),
            ("2025-02-01", 0, 0),
        ]

        # A customer with no event: zero, not a 404.
        nobody = (await get(session, key, f"{base}/v1/customers/nobody/credits"))["data"]
        assert nobody == {
            "customer_ref": "nobody",
            "balance": 0,
            "auto_reload": {"enabled": False, "threshold": None, "tokens": None, "price": None,
                            "currency": None},
            "low_balance_threshold": None,
            "last_topped_up_at": None,
            "payment_method": None,
            "grants": [],
        }  # fmt: skip
        ledger = await get(session, key, f"{base}/v1/customers/nobody/ledger")
        assert (ledger["data"], ledger["meta"]["pagination"]) == ([], EMPTY_PAGE)
        used = (await get(session, key, f"{base}/v1/customers/nobody/usage"))["data"]
        assert (used["tokens"], used["events"], used["features"]) == (0, 0, [])
        nothing = (await get(session, key, history.replace("alice", "nobody")))["data"]
        assert nothing["tokens"] == 0 and len(nothing["periods"]) == 59

        # Bad parameters: 422 in the envelope, naming the parameter.
        ledger_path = f"{base}/v1/customers/alice/ledger"
        charges_cursor = base64.urlsafe_b64encode(b'["charges",1,1]').decode().rstrip("=")
        cases = [
            (f"{ledger_path}?limit=0", "invalid_request", "limit"),
            (f"{ledger_path}?limit=101", "invalid_request", "limit"),
            (f"{ledger_path}?limit=ten", "invalid_request", "limit"),
            (f"{ledger_path}?cursor=%21%21", "invalid_cursor", "cursor"),
            (f"{ledger_path}?cursor={charges_cursor}", "invalid_cursor", "cursor"),
            (f"{ledger_path}?cursor=bm90IGpzb24", "invalid_cursor", "cursor"),  # "not json"
            (f"{ledger_path}?cursor=WyJsZWRnZXIiLCIxIl0", "invalid_cursor", "cursor"),
            (f"{ledger_path}?cursor=" + "A" * 1001, "invalid_request", "cursor"),
            (f"{base}/v1/customers/alice/usage/history?end_date=2025-01-01",
             "invalid_request", "start_date"),
            (f"{history}&granularity=week", "invalid_request", "granularity"),
            (url(base, "/v1/customers/alice/usage/history", start_date="2025-02-01",
                 end_date="2025-01-01"), "invalid_request", "end_date"),
            (url(base, "/v1/customers/alice/usage/history", start_date="2020-01-01",
                 end_date="2025-01-01"), "invalid_request", "end_date"),
            (url(base, "/v1/customers/alice/usage/history", start_date="2025-01-01",
                 end_date="2025-02-30"), "invalid_request", "end_date"),
            (url(base, "/v1/customers/alice/usage/history", start_date="9999-12-31",
                 end_date="9999-12-31"), "invalid_request", "end_date"),
            (url(base, "/v1/customers/alice/usage", start="2025-01-01T00:00:00"),
             "invalid_request", "start"),
            (url(base, "/v1/customers/alice/usage", start="2025-02-01", end="2025-01-01"),
             "invalid_request", "end"),
            (f"{base}/v1/customers/{'x' * 201}/credits", "invalid_request", "customer_ref"),
            (f"{base}/v1/charges?status=refunded", "invalid_request", "status"),
            (f"{base}/v1/charges?since=yesterday", "invalid_request", "since"),
            (f"{base}/v1/payouts/{'p' * 201}", "invalid_request", "payout_id"),
            (f"{base}/v1/payouts?currency=EURO", "invalid_request", "currency"),
            (f"{base}/v1/dead-letters?reason=" + "r" * 201, "invalid_request", "reason"),
        ]  # fmt: skip
        for address, code, param in cases:
            status, doc, _ = await call(session, "GET", address, key=key)
            assert status == 422, (address, doc)
            assert (doc["error"]["code"], doc["error"]["param"]) == (code, param), address
            assert "9999-12-31" not in address or "before 9999-12-31" in doc["error"]["message"]


async def test_a_cursor_walk_sees_every_charge_once_while_more_arrive(
    settings: Settings,
) -> None:
    await create_flows(settings, [("flow_a", "default"), ("flow_b", "default")])
    conn = await asyncpg.connect(settings.dsn)
    try:
        # 2,500 charges in five batches; each batch shares one recorded_at (ties broken by
        # charge_id), the batches an hour apart, the newest first inserted.
        for n, hours_ago in enumerate((1, 2, 3, 4, 5)):
            at = NOW - timedelta(hours=hours_ago)
            await insert_charges(conn, ("flow_a", "flow_b")[n % 2], 500, recorded_at=at,
                                 prefix=f"batch{n}")  # fmt: skip
        await conn.execute(
            'UPDATE charges SET metadata = \'{"job_id": "987"}\' WHERE reference = $1',
            "batch0-flow_a-EUR-1",
        )
        originals = {r["charge_id"] for r in await conn.fetch("SELECT charge_id FROM charges")}
        assert len(originals) == 2500
        key = new_key(settings, "read")["key"]
        async with api_server(settings) as base, aiohttp.ClientSession() as session:
            seen: list[dict[str, Any]] = []
            late: set[int] = set()
            cursor = None
            pages = 0
            while True:
                doc = await get(session, key, url(base, "/v1/charges", limit=100, cursor=cursor))
                seen.extend(doc["data"])
                pages += 1
                page = doc["meta"]["pagination"]
                if not page["has_more"]:
                    assert page["cursor"] is None
                    break
                cursor = page["cursor"]
                assert isinstance(cursor, str) and len(cursor) < 100
                # New charges arrive (newer than the walk: not shown), and charges recorded
                # earlier than any so far (ahead of the walk: shown once).
                await insert_charges(conn, "flow_a", 20, prefix=f"new{pages}")
                await insert_charges(conn, "flow_b", 3, prefix=f"old{pages}",
                                     recorded_at=NOW - timedelta(days=1))  # fmt: skip
                late.update(
                    r["charge_id"]
                    for r in await conn.fetch(
                        "SELECT charge_id FROM charges WHERE reference LIKE $1", f"old{pages}-%"
                    )
                )
            ids = [c["charge_id"] for c in seen]
            assert len(ids) == len(set(ids)), "a charge was shown twice"
            assert set(ids) == originals | late
            keys = [(moment(c["recorded_at"]), c["charge_id"]) for c in seen]
            assert keys == sorted(keys, reverse=True), "not newest first"
            assert pages == 26 and len(late) == 75

            first = seen[0]
            assert set(first) == CHARGE_FIELDS
            assert first["reference"] == "batch0-flow_a-EUR-500"
            assert (first["status"], first["payout_id"], first["currency"]) == (
                "recorded", None, "EUR"
            )  # fmt: skip
            with_metadata = next(c for c in seen if c["reference"] == "batch0-flow_a-EUR-1")
            assert with_metadata["metadata"] == {"job_id": "987"}

            # Filters, each walked to the end and compared with Postgres.
            filters: list[tuple[dict[str, Any], str, list[Any]]] = [
                ({"flow_id": "flow_b"}, "flow_id = $1", ["flow_b"]),
                ({"customer_ref": "cust_3"}, "customer_ref = $1", ["cust_3"]),
                ({"since": rfc3339(NOW - timedelta(hours=3)),
                  "until": rfc3339(NOW - timedelta(hours=1))},
                 "recorded_at >= $1 AND recorded_at < $2",
                 [NOW - timedelta(hours=3), NOW - timedelta(hours=1)]),
                ({"flow_id": "flow_a", "customer_ref": "cust_5", "status": "recorded",
                  "until": rfc3339(NOW - timedelta(hours=2))},
                 "flow_id = $1 AND customer_ref = $2 AND recorded_at < $3",
                 ["flow_a", "cust_5", NOW - timedelta(hours=2)]),
            ]  # fmt: skip
            for params, where, args in filters:
                rows = await walk(session, key, base, "/v1/charges", limit=100, **params)
                want = await conn.fetch(
                    f"SELECT charge_id FROM charges WHERE {where} "
                    "ORDER BY recorded_at DESC, charge_id DESC",
                    *args,
                )
                assert [r["charge_id"] for r in rows] == [r["charge_id"] for r in want], params
                assert want, params
            none = await get(session, key, url(base, "/v1/charges", status="paid_out"))
            assert (none["data"], none["meta"]["pagination"]) == ([], EMPTY_PAGE)
            tz = url(base, "/v1/charges", since=(NOW - timedelta(hours=3)).isoformat())
            assert "%2B00%3A00" in tz  # an offset, encoded
            assert len((await get(session, key, tz))["data"]) == 20
    finally:
        await conn.close()


async def test_payouts_and_dead_letters(settings: Settings) -> None:
    await setup_pipeline(settings, partitions=1, flows=[("flow_x", "active")])
    await create_flows(settings, [("flow_a", "acme"), ("flow_b", "beta")])
    conn = await asyncpg.connect(settings.dsn)
    try:
        await insert_charges(conn, "flow_a", 30, prefix="one")
        await insert_charges(conn, "flow_a", 5, currency="USD", prefix="one")
        await insert_charges(conn, "flow_b", 12, prefix="one")
        cut = functools.partial(
            cut_payouts, conn, until=None, period=settings.payout_period,
            topic=settings.topic_payouts,
        )  # fmt: skip
        # A cut's end is the database's time to the millisecond, and it takes the charges
        # recorded before it: let a millisecond pass after the inserts.
        await asyncio.sleep(0.01)
        assert len((await cut()).payouts) == 3
        await insert_charges(conn, "flow_a", 4, prefix="two")
        await asyncio.sleep(0.01)
        assert len((await cut()).payouts) == 1
        await insert_charges(conn, "flow_b", 2, prefix="unpaid")
    finally:
        await conn.close()
    bad = [record(b"not json", key="k"), record({"type": "charge", "flow_id": "nope",
           "customer_ref": "c1", "reference": "r1", "amount": 5, "currency": "EUR"}),
           record({"type": "charge", "flow_id": "nope", "customer_ref": "c2",
                   "reference": "r2", "amount": 5, "currency": "EUR"}),
           record({"type": "charge", "flow_id": "flow_x", "customer_ref": "c3",
                   "reference": "r3", "amount": 0, "currency": "EUR"})]  # fmt: skip
    async with running_worker(settings, "charges") as process:
        await produce(settings, settings.topic_charges, bad)
        await wait_for(functools.partial(ingest_done, process, len(bad)), what="dead letters")
    key = new_key(settings, "read")["key"]
    async with api_server(settings) as base, aiohttp.ClientSession() as session:
        payouts = await walk(session, key, base, "/v1/payouts", limit=2)
        want = await fetch(
            settings,
            "SELECT payout_id, charge_count, amount FROM payouts "
            "ORDER BY period_end DESC, payee_ref, currency",
        )
        assert [(p["payout_id"], p["charge_count"], p["amount"]) for p in payouts] == [
            tuple(r) for r in want
        ]
        assert len(payouts) == 4 and all(set(p) >= PAYOUT_FIELDS for p in payouts)
        assert [(p["payee_ref"], p["currency"], p["charge_count"]) for p in payouts] == [
            ("acme", "EUR", 4), ("acme", "EUR", 30), ("acme", "USD", 5), ("beta", "EUR", 12)
        ]  # fmt: skip
        acme_eur = await walk(session, key, base, "/v1/payouts", payee_ref="acme", currency="eur")
        assert [p["charge_count"] for p in acme_eur] == [4, 30]
        recorded = await get(session, key, url(base, "/v1/payouts", status="sent"))
        assert recorded["data"] == []

        # One payout, its charges ten a page.
        payout_id = payouts[1]["payout_id"]
        path = f"/v1/payouts/{quote(payout_id)}"
        charges: list[dict[str, Any]] = []
        cursor = None
        while True:
            doc = await get(session, key, url(base, path, limit=10, cursor=cursor))
            shown = doc["data"]
            assert all(shown[k] == v for k, v in payouts[1].items())
            charges.extend(shown["charges"])
            cursor = doc["meta"]["pagination"]["cursor"]
            if not doc["meta"]["pagination"]["has_more"]:
                break
        assert len(charges) == 30 == len({c["charge_id"] for c in charges})
        assert all(set(c) == CHARGE_FIELDS for c in charges)
        assert {(c["payout_id"], c["status"], c["flow_id"]) for c in charges} == {
            (payout_id, "paid_out", "flow_a")
        }
        assert sum(c["amount"] for c in charges) == payouts[1]["amount"]
        paid = await walk(session, key, base, "/v1/charges", status="paid_out", limit=100)
        assert len(paid) == 51
        status, doc, _ = await call(session, "GET", f"{base}/v1/payouts/po_nope", key=key)
        assert (status, doc["error"]["code"], doc["error"]["param"]) == (
            404, "not_found", "payout_id"
        )  # fmt: skip

        # Dead letters, two a page, newest first.
        letters = await walk(session, key, base, "/v1/dead-letters", limit=2)
        want = await fetch(
            settings,
            'SELECT dead_letter_id AS id, reason, "offset" FROM dead_letters '
            "ORDER BY dead_letter_id DESC",
        )
        assert [(d["id"], d["reason"], d["offset"]) for d in letters] == [tuple(r) for r in want]
        assert sorted((d["offset"], d["reason"]) for d in letters) == [
            (0, "invalid_json"), (1, "unknown_flow"), (2, "unknown_flow"), (3, "invalid_event")
        ]  # fmt: skip
        assert all(set(d) >= DEAD_LETTER_FIELDS for d in letters)
        assert {(d["topic"], d["partition"]) for d in letters} == {(settings.topic_charges, 0)}
        unknown = await walk(session, key, base, "/v1/dead-letters", reason="unknown_flow")
        assert [d["id"] for d in unknown] == [d["id"] for d in letters
                                              if d["reason"] == "unknown_flow"]  # fmt: skip
        assert {d["detail"] for d in unknown} and all(d["detail"] for d in letters)
        since = moment(letters[-1]["created_at"]) + timedelta(microseconds=1)
        later = await walk(session, key, base, "/v1/dead-letters", since=rfc3339(since))
        assert [d["reason"] for d in later] == [d["reason"] for d in letters
                                                if moment(d["created_at"]) >= since]  # fmt: skip
        future = rfc3339(NOW + timedelta(days=1))
        assert await walk(session, key, base, "/v1/dead-letters", since=future) == []


async def test_reads_need_a_key_with_the_read_scope(settings: Settings) -> None:
    ingest = new_key(settings, "ingest")["key"]
    reader = new_key(settings, "read")["key"]
    paths = ["/v1/charges", "/v1/customers/c/credits", "/v1/customers/c/ledger",
             "/v1/customers/c/usage",
             "/v1/customers/c/usage/history?start_date=2025-01-01&end_date=2025-01-02",
             "/v1/payouts", "/v1/payouts/po_x", "/v1/dead-letters"]  # fmt: skip
    async with api_server(settings) as base, aiohttp.ClientSession() as session:
        for path in paths:
            status, doc, _ = await call(session, "GET", f"{base}{path}")
            assert (status, doc["error"]["code"]) == (401, "missing_api_key"), path
            status, doc, _ = await call(session, "GET", f"{base}{path}", key=ingest)
            assert (status, doc["error"]["code"]) == (403, "insufficient_scope"), path
            status, doc, _ = await call(
                session, "GET", f"{base}{path}", headers={"X-API-Key": reader}
            )
            assert status == (404 if path == "/v1/payouts/po_x" else 200), (path, doc)
        async with session.get(f"{base}/openapi.json") as response:
            document = orjson.loads(await response.read())
    validate(document)
    history = document["paths"]["/v1/customers/{customer_ref}/usage/history"]["get"]
    required = {p["name"] for p in history["parameters"] if p.get("required")}
    assert required == {"customer_ref", "start_date", "end_date"}


async def test_flows_and_webhooks_are_lists_like_the_others(settings: Settings) -> None:
    """Every list pages the same way: newest first, ``limit`` 1-100, an opaque cursor."""
    await setup_pipeline(settings, partitions=1)
    for n in (1, 2, 3):  # one transaction each: created in this order
        await create_flows(settings, [(f"flow_{n}", f"payee_{n}")])
    key = new_key(settings, "read", "admin")["key"]
    async with api_server(settings) as base, aiohttp.ClientSession() as session:
        for n in (1, 2, 3):
            status, doc, _ = await call(
                session, "POST", f"{base}/v1/webhooks", key=key,
                body={"url": f"http://127.0.0.1:9/hook-{n}"},
            )  # fmt: skip
            assert status == 201, doc
        for path, name in (("/v1/flows", "flow_id"), ("/v1/webhooks", "url")):
            seen, cursor = [], None
            while True:
                query = "?limit=2" + ("" if cursor is None else f"&cursor={cursor}")
                status, doc, _ = await call(session, "GET", f"{base}{path}{query}", key=key)
                assert status == 200, doc
                seen += [item[name] for item in doc["data"]]
                pagination = doc["meta"]["pagination"]
                assert pagination["has_more"] is (pagination["cursor"] is not None)
                if not pagination["has_more"]:
                    break
                cursor = pagination["cursor"]
            want = (
                ["flow_3", "flow_2", "flow_1"]
                if path == "/v1/flows"
                else [f"http://127.0.0.1:9/hook-{n}" for n in (3, 2, 1)]
            )
            assert seen == want, path
            for bad in ("limit=0", "limit=101", "limit=abc", "cursor=garbage"):
                status, doc, _ = await call(session, "GET", f"{base}{path}?{bad}", key=key)
                assert status == 422, (path, bad, doc)
            # A cursor this list gave out is refused by another list.
            other = "/v1/webhooks" if path == "/v1/flows" else "/v1/flows"
            status, doc, _ = await call(session, "GET", f"{base}{other}?cursor={cursor}", key=key)
            assert (status, doc["error"]["code"]) == (422, "invalid_cursor"), (other, doc)


async def test_an_id_with_a_slash_is_reached_with_an_encoded_slash(settings: Settings) -> None:
    """ "/" is printable: a flow or customer may hold one, and %2F in a path is part of the
    id, not a separator."""
    await setup_pipeline(settings, partitions=1)
    await create_flows(settings, [("team/a", "payee/b")])
    key = new_key(settings, "read", "admin", "ingest")["key"]
    charge = {"amount": 5, "currency": "EUR", "customer_ref": "org/7", "reference": "r/1"}
    async with (
        api_server(settings) as base,
        aiohttp.ClientSession() as session,
        running_worker(settings, "charges") as process,
    ):
        status, doc, _ = await call(session, "GET", f"{base}/v1/flows/team%2Fa", key=key)
        assert status == 200, doc
        assert (status, doc["data"]["flow_id"], doc["data"]["payee_ref"]) == (
            200, "team/a", "payee/b",
        )  # fmt: skip
        status, doc, _ = await call(
            session, "POST", f"{base}/v1/flows/team%2fa/charges", key=key, body=charge,
            headers={"Prefer": "wait=10"},
        )  # fmt: skip
        assert (status, doc["data"]["flow_id"], doc["data"]["customer_ref"]) == (
            201, "team/a", "org/7",
        )  # fmt: skip
        await wait_for(functools.partial(ingest_done, process, 1), what="the charge")
        status, doc, _ = await call(session, "GET", f"{base}/v1/customers/org%2F7/credits", key=key)
        assert (status, doc["data"]["balance"]) == (200, 0)
        status, doc, _ = await call(session, "POST", f"{base}/v1/flows/team%2Fa/pause", key=key)
        assert (status, doc["data"]["status"]) == (200, "paused")
        # Still one segment each: the path with a real slash is no route.
        status, doc, _ = await call(session, "GET", f"{base}/v1/flows/team/a", key=key)
        assert (status, doc["error"]["code"]) == (404, "not_found")


async def test_a_customer_reference_no_event_can_hold_is_refused_by_reads_too(
    settings: Settings,
) -> None:
    await setup_pipeline(settings, partitions=1)
    key = new_key(settings, "read", "billing")["key"]
    async with api_server(settings) as base, aiohttp.ClientSession() as session:
        for ref in ("a%09b", "%E2%80%8B", "x" * 201):
            for method, tail in (("GET", "credits"), ("GET", "ledger"), ("GET", "usage"),
                                 ("POST", "payment-setup")):  # fmt: skip
                url = f"{base}/v1/customers/{ref}/{tail}"
                status, doc, _ = await call(session, method, url, key=key)
                assert (status, doc["error"]["param"]) == (422, "customer_ref"), (url, doc)
        status, doc, _ = await call(session, "GET", f"{base}/v1/customers/a%20b/credits", key=key)
        assert (status, doc["data"]["balance"]) == (200, 0)  # a space is printable
