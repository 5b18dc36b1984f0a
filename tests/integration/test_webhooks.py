"""Outbound webhooks against real receivers: aiohttp servers on the loopback network that
answer as each test needs, fed by the real pipeline (usage and grants published to Kafka,
the usage worker writing alerts, the webhooks worker delivering them).

Signatures are checked here by code written from the published scheme (Standard Webhooks:
HMAC-SHA256 of ``{webhook-id}.{webhook-timestamp}.{body}`` under the base64-decoded secret
after ``whsec_``), not by chargeline's own.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import itertools
import os
import signal
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiohttp import web

from tests.support import (
    api_server,
    assert_one_line_error,
    call,
    cli,
    consume_all,
    fetch,
    fetchval,
    free_port,
    grant,
    new_key,
    ok_json,
    produce,
    record,
    running_worker,
    settings_env,
    setup_pipeline,
    spawn_worker,
    usage,
    wait_for,
)
from workers import db, webhook_signing
from workers.settings import Settings

Event = dict[str, Any]
# Per customer, in order: +100 (recovered), -150 (depleted), +100 (recovered),
# -100 (depleted), +200 (recovered): five alerts each.
STEPS = (("grant", 100), ("usage", 150), ("grant", 100), ("usage", 100), ("grant", 200))


# --- a receiver -------------------------------------------------------------------------------


@dataclass
class Request:
    headers: dict[str, str]
    body: bytes
    at: float
    status: int
    position: int

    @property
    def alert(self) -> dict[str, Any]:
        loaded: dict[str, Any] = orjson.loads(self.body)
        return loaded


@dataclass
class Receiver:
    """An HTTP endpoint on 127.0.0.1: ``status(request number, body)`` says what it answers;
    ``delay`` seconds before answering (until ``release`` is set, at the latest)."""

    status: Callable[[int, bytes], int] = lambda n, body: 204
    delay: float = 0.0
    requests: list[Request] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: int = 0
    most_in_flight: int = 0
    url: str = ""
    _runner: web.AppRunner | None = None

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        assert self._runner is not None
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        position = len(self.requests)
        answer = self.status(position, body)
        self.requests.append(
            Request(
                {k.lower(): v for k, v in request.headers.items()},
                body,
                time.monotonic(),
                answer,
                position,
            )
        )
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.delay:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.release.wait(), timeout=self.delay)
        finally:
            self.in_flight -= 1
        return web.Response(status=answer)

    def succeeded(self) -> list[Request]:
        return [r for r in self.requests if 200 <= r.status < 300]

    def ids(self) -> set[str]:
        return {r.headers["webhook-id"] for r in self.succeeded()}


def verify_signature(secret: str, request: Request) -> None:
    """The signature as the Standard Webhooks scheme defines it, computed here."""
    assert secret.startswith("whsec_")
    key = base64.b64decode(secret[len("whsec_") :])
    msg_id, stamp = request.headers["webhook-id"], request.headers["webhook-timestamp"]
    content = msg_id.encode() + b"." + stamp.encode() + b"." + request.body
    expected = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
    assert f"v1,{expected}" in request.headers["webhook-signature"].split(" ")
    assert abs(time.time() - int(stamp)) < 300


# --- the pipeline -----------------------------------------------------------------------------


def quick(settings: Settings, **overrides: Any) -> Settings:
    update: dict[str, Any] = {"webhook_poll_interval_s": 0.05, "outbox_poll_ms": 20}
    update.update(overrides)
    return settings.model_copy(update=update)


async def add_endpoint(
    settings: Settings, url: str, events: Sequence[str] | None = None
) -> tuple[int, str]:
    """An endpoint with a secret of the test's own making, in the published format."""
    secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    conn = await asyncpg.connect(settings.dsn)
    try:
        row = await conn.fetchrow(
            db.QUERIES["webhook_endpoint_create"],
            url,
            secret,
            None if events is None else list(events),
        )
    finally:
        await conn.close()
    return int(row["id"]), secret


def alert_storm(customers: int) -> list[Event]:
    events: list[Event] = []
    for step, (kind, tokens) in enumerate(STEPS):
        for n in range(customers):
            customer, reference = f"c{n:02d}", f"{kind}{step}"
            if kind == "grant":
                events.append(grant(customer, reference, tokens))
            else:
                events.append(usage(customer, reference, tokens))
    return events


async def publish(settings: Settings, events: list[Event]) -> None:
    await produce(settings, settings.topic_usage, [record(e) for e in events])


async def alerts_in_commit_order(settings: Settings) -> list[dict[str, Any]]:
    rows = await fetch(
        settings, "SELECT record_value FROM outbox WHERE kind = 'alert' ORDER BY outbox_id"
    )
    return [orjson.loads(row["record_value"]) for row in rows]


async def alert_count(settings: Settings) -> int:
    return int(await fetchval(settings, "SELECT count(*) FROM outbox WHERE kind = 'alert'"))


async def delivery_states(settings: Settings, endpoint_id: int) -> list[tuple[str, int, int]]:
    rows = await fetch(
        settings,
        "SELECT status, attempts, coalesce(last_status, 0) AS last_status "
        "FROM webhook_deliveries WHERE endpoint_id = $1 ORDER BY delivery_id",
        endpoint_id,
    )
    return [(r["status"], r["attempts"], r["last_status"]) for r in rows]


def per_customer(alerts: list[dict[str, Any]]) -> dict[str, list[str]]:
    order: dict[str, list[str]] = defaultdict(list)
    for alert in alerts:
        order[alert["customer_ref"]].append(alert["alert_id"])
    return dict(order)


# --- 0. the signature against the published test vector ------------------------------------

VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # noqa: S105 -- published
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_signatures_reproduce_the_standard_webhooks_test_vector() -> None:
    """The vector of the Standard Webhooks reference implementations: what says that a
    receiver's own library accepts what chargeline sends."""
    msg_id, stamp, body = "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'
    assert webhook_signing.sign(VECTOR_SECRET, msg_id, stamp, body) == VECTOR_SIGNATURE
    several = f"v1,bm9wZQ== {VECTOR_SIGNATURE}"
    assert webhook_signing.verify(VECTOR_SECRET, msg_id, str(stamp), body, several)
    assert not webhook_signing.verify(VECTOR_SECRET, msg_id, str(stamp), body + b" ", several)
    secret = webhook_signing.new_secret()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 24


# --- 1. retries and signatures ----------------------------------------------------------------


async def test_an_endpoint_failing_three_times_gets_the_alert_on_the_fourth_signed(
    settings: Settings,
) -> None:
    settings = quick(settings, webhook_retry_schedule_s="0.2,0.2,0.2,0.2", webhook_timeout_s=5)
    await setup_pipeline(settings, partitions=1)
    async with (
        Receiver(lambda n, body: 500 if n < 3 else 204) as flaky,
        Receiver(lambda n, body: 503) as broken,
    ):
        flaky_id, secret = await add_endpoint(settings, flaky.url)
        broken_id, _ = await add_endpoint(settings, broken.url)
        async with running_worker(settings, "usage", "outbox", "webhooks") as process:
            await publish(settings, [grant("c1", "g1", 100)])
            await wait_for(lambda: _at_least(flaky, 4), timeout=30, what="four tries")

            async def broken_failed() -> bool:
                return await delivery_states(settings, broken_id) == [("failed", 5, 503)]

            await wait_for(broken_failed, timeout=30, what="the broken endpoint's delivery failed")
            sample = process.metrics.registry.get_sample_value
            counted = {
                (endpoint, result): sample(
                    "chargeline_webhook_deliveries_total",
                    {"endpoint": str(endpoint), "result": result},
                )
                for endpoint in (flaky_id, broken_id)
                for result in ("succeeded", "retried", "failed")
            }
    assert [r.status for r in flaky.requests] == [500, 500, 500, 204]
    assert [r.status for r in broken.requests] == [503] * 5, "four retries, then failed"
    (published,) = await consume_all(settings, settings.topic_alerts, expected=1)
    alert = orjson.loads(published.value)
    for request in flaky.requests:
        assert request.body == published.value, "the body is the alert as on billing.alerts"
        assert request.headers["webhook-id"] == alert["alert_id"]
        assert request.headers["content-type"] == "application/json"
        verify_signature(secret, request)
    gaps = [b.at - a.at for a, b in itertools.pairwise(flaky.requests)]
    assert all(gap >= 0.15 for gap in gaps), gaps
    assert await delivery_states(settings, flaky_id) == [("succeeded", 4, 204)]
    assert counted == {
        (flaky_id, "succeeded"): 1,
        (flaky_id, "retried"): 3,
        (flaky_id, "failed"): None,
        (broken_id, "succeeded"): None,
        (broken_id, "retried"): 4,
        (broken_id, "failed"): 1,
    }


async def _at_least(receiver: Receiver, n: int) -> bool:
    return len(receiver.requests) >= n


# --- 2. a slow endpoint holds back no one else ------------------------------------------------


async def test_an_endpoint_that_never_answers_delays_no_other(settings: Settings) -> None:
    settings = quick(
        settings,
        webhook_timeout_s=30,
        webhook_concurrency=4,
        webhook_endpoint_concurrency=2,
        webhook_retry_schedule_s="60",
    )
    await setup_pipeline(settings, partitions=2)
    customers = 8
    async with Receiver(delay=120) as silent, Receiver() as fast:
        await add_endpoint(settings, silent.url)
        await add_endpoint(settings, fast.url)
        async with running_worker(settings, "usage", "outbox", "webhooks"):
            await publish(settings, [grant(f"c{n}", "g", 100) for n in range(customers)])
            await wait_for(
                functools.partial(_alerts_at_least, settings, customers), what="the alerts"
            )
            started = time.monotonic()
            await wait_for(
                lambda: _ids_at_least(fast, customers), timeout=3, what="the fast endpoint"
            )
            first_round = time.monotonic() - started
            # Ingestion and Kafka publishing go on while the silent endpoint holds its slots.
            await publish(settings, [usage(f"c{n}", "u", 150) for n in range(customers)])
            await wait_for(
                functools.partial(_alerts_at_least, settings, 2 * customers),
                timeout=10,
                what="the second alerts",
            )
            started = time.monotonic()
            await wait_for(
                lambda: _ids_at_least(fast, 2 * customers), timeout=3, what="the second round"
            )
            second_round = time.monotonic() - started
            await wait_for(
                functools.partial(_all_published, settings), timeout=5, what="Kafka publishing"
            )
            assert silent.in_flight == 2, "the silent endpoint holds exactly its cap"
            silent.release.set()
    assert silent.most_in_flight == 2, "never more than the per-endpoint cap in flight"
    assert first_round < 3 and second_round < 3, (first_round, second_round)


async def _alerts_at_least(settings: Settings, n: int) -> bool:
    return await alert_count(settings) >= n


async def _ids_at_least(receiver: Receiver, n: int) -> bool:
    return len(receiver.ids()) >= n


async def _all_published(settings: Settings) -> bool:
    return bool(
        await fetchval(settings, "SELECT count(*) = 0 FROM outbox WHERE published_at IS NULL")
    )


# --- 3. commit order per customer -------------------------------------------------------------


class FailsFirst:
    """Each alert fails 0, 1 or 2 times (decided by its id) before it is accepted."""

    def __init__(self) -> None:
        self.tries: Counter[bytes] = Counter()

    def __call__(self, n: int, body: bytes) -> int:
        self.tries[body] += 1
        failures = int(orjson.loads(body)["alert_id"][:8], 16) % 3
        return 204 if self.tries[body] > failures else 500


async def test_alerts_reach_a_receiver_in_commit_order_per_customer(settings: Settings) -> None:
    settings = quick(
        settings,
        webhook_retry_schedule_s=",".join(["0.05"] * 7),
        webhook_concurrency=8,
        webhook_endpoint_concurrency=4,
    )
    await setup_pipeline(settings, partitions=3)
    customers = 6
    async with Receiver(FailsFirst()) as receiver:
        endpoint_id, secret = await add_endpoint(settings, receiver.url)
        async with running_worker(settings, "usage", "outbox", "webhooks"):
            await publish(settings, alert_storm(customers))
            total = customers * len(STEPS)
            await wait_for(
                lambda: _ids_at_least(receiver, total), timeout=60, what="every alert delivered"
            )
    alerts = await alerts_in_commit_order(settings)
    assert len(alerts) == total
    committed = per_customer(alerts)
    accepted = per_customer([r.alert for r in receiver.succeeded()])
    assert accepted == committed, "a customer's alerts accepted out of commit order"
    # Stronger: no request for an alert arrived before the one before it was accepted.
    accepted_at = {r.headers["webhook-id"]: r.position for r in receiver.succeeded()}
    for ids in committed.values():
        for earlier, later in itertools.pairwise(ids):
            first_try = min(
                r.position for r in receiver.requests if r.headers["webhook-id"] == later
            )
            assert accepted_at[earlier] < first_try
    for request in receiver.requests:
        assert request.headers["webhook-id"] == request.alert["alert_id"]
        verify_signature(secret, request)
    assert len(receiver.succeeded()) == total, "each alert accepted once"
    assert {s for s, _, _ in await delivery_states(settings, endpoint_id)} == {"succeeded"}
    assert len(receiver.requests) > total, "some were retried"


# --- 4. a killed worker loses nothing ---------------------------------------------------------


async def test_a_killed_worker_loses_no_delivery(settings: Settings, tmp_path: Path) -> None:
    settings = quick(
        settings,
        webhook_timeout_s=1,
        webhook_concurrency=4,
        webhook_endpoint_concurrency=4,
        webhook_retry_schedule_s="0.1,0.1,0.1",
    )
    await setup_pipeline(settings, partitions=2)
    customers = 10
    total = customers * len(STEPS)
    kinds = ("usage", "outbox", "webhooks")
    async with Receiver(delay=0.2) as receiver:
        await add_endpoint(settings, receiver.url)
        env = settings_env(settings)
        worker = spawn_worker(env, *kinds, log_path=str(tmp_path / "w1.log"))
        restarted: subprocess.Popen[bytes] | None = None
        try:
            await publish(settings, alert_storm(customers))
            await wait_for(lambda: _at_least(receiver, 8), timeout=60, what="deliveries under way")
            worker.send_signal(signal.SIGKILL)
            await asyncio.to_thread(worker.wait, 10)
            heard_before = len(receiver.requests)
            undelivered = int(
                await fetchval(
                    settings, "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'"
                )
            )
            restarted = spawn_worker(env, *kinds, log_path=str(tmp_path / "w2.log"))

            async def all_delivered() -> bool:
                if await alert_count(settings) < total:
                    return False
                ids = {a["alert_id"] for a in await alerts_in_commit_order(settings)}
                return ids <= receiver.ids() and await _none_pending(settings)

            await wait_for(all_delivered, timeout=90, what="every alert after the restart")
        finally:
            # Waited for in a thread: the receiver, in this event loop, keeps answering.
            for proc in (worker, restarted):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    await asyncio.to_thread(proc.wait, 40)
    alerts = await alerts_in_commit_order(settings)
    assert len(alerts) == total
    assert undelivered > 0, "the kill came after everything was delivered"
    assert {a["alert_id"] for a in alerts} == receiver.ids()
    first_seen: dict[str, list[str]] = defaultdict(list)
    seen: set[str] = set()
    for request in receiver.succeeded():
        if request.headers["webhook-id"] not in seen:
            seen.add(request.headers["webhook-id"])
            first_seen[request.alert["customer_ref"]].append(request.headers["webhook-id"])
    assert dict(first_seen) == per_customer(alerts), "first seen out of commit order"
    unfinished = await fetch(
        settings,
        "SELECT delivery_id, status, attempts, last_status, last_error, claimed_until, now() "
        "FROM webhook_deliveries WHERE status <> 'succeeded'",
    )
    assert not unfinished, [dict(r) for r in unfinished]
    print(
        f"killed after {heard_before} requests with {undelivered} deliveries pending; "
        f"{len(receiver.requests)} requests in all for {total} alerts"
    )


async def _none_pending(settings: Settings) -> bool:
    return bool(
        await fetchval(
            settings, "SELECT count(*) = 0 FROM webhook_deliveries WHERE status = 'pending'"
        )
    )


# --- 5. the command line ----------------------------------------------------------------------


async def _insert_delivery(settings: Settings, endpoint_id: int, status: str) -> int:
    return int(
        await fetchval(
            settings,
            """INSERT INTO webhook_deliveries (endpoint_id, alert_id, customer_ref, event_type,
                   payload, alert_created_at, status, attempts, next_attempt_at, last_status)
               VALUES ($1, gen_random_uuid(), 'c1', 'credit_balance_low',
                       convert_to('{}', 'UTF8'), now(), $2, 8, NULL, 500)
               RETURNING delivery_id""",
            endpoint_id,
            status,
        )
    )


async def test_the_webhooks_commands(settings: Settings) -> None:
    done = cli(
        settings, "webhooks", "add", "https://example.test/hook",
        "--event", "credit_balance_low", "--event", "credit_balance_depleted",
        "--format", "json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    created = orjson.loads(done.stdout)
    secret = created["secret"]
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 24
    assert created["events"] == ["credit_balance_depleted", "credit_balance_low"]
    table = cli(settings, "webhooks", "add", "http://127.0.0.1:9/all")
    assert table.returncode == 0, table.stderr
    assert table.stdout.count("whsec_") == 1, "the table shows the secret once"

    listed = cli(settings, "webhooks", "list", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    assert "whsec_" not in listed.stdout, "a listing never shows a secret"
    endpoints = orjson.loads(listed.stdout)
    assert [(e["id"], e["url"], e["events"]) for e in endpoints] == [
        (created["id"], "https://example.test/hook", created["events"]),
        (created["id"] + 1, "http://127.0.0.1:9/all", None),
    ]

    for args, code, mentions in [
        (("add", "ftp://example.test/x"), 2, "http"),
        (("add", "http://"), 2, "host"),
        (("add", "https://example.test/" + "a" * 2000), 2, "2000"),
        (("add", "https://example.test/x", "--event", "bogus"), 2, "invalid choice"),
        (("remove", "0"), 2, ">= 1"),
        (("remove", "abc"), 2, "whole number"),
        (("remove", "999"), 1, "no webhook endpoint 999"),
        (("deliveries", "--status", "nope"), 2, "invalid choice"),
        (("resend", "999"), 1, "no webhook delivery 999"),
    ]:
        assert_one_line_error(cli(settings, "webhooks", *args), code=code, mentions=mentions)

    failed = await _insert_delivery(settings, created["id"], "failed")
    rows = ok_json(settings, "webhooks", "deliveries", "--endpoint", str(created["id"]))
    assert [(r["id"], r["status"], r["attempts"]) for r in rows] == [(failed, "failed", 8)]
    assert ok_json(settings, "webhooks", "deliveries", "--status", "pending") == []
    resent = ok_json(settings, "webhooks", "resend", str(failed))
    assert (resent["id"], resent["status"], resent["attempts"]) == (failed, "pending", 0)
    assert [
        r["id"] for r in ok_json(settings, "webhooks", "deliveries", "--status", "pending")
    ] == [failed]

    removed = ok_json(settings, "webhooks", "remove", str(created["id"]))
    assert removed["removed_at"] is not None
    assert [e["id"] for e in ok_json(settings, "webhooks", "list")] == [created["id"] + 1]
    (dropped,) = ok_json(settings, "webhooks", "deliveries", "--endpoint", str(created["id"]))
    assert (dropped["status"], dropped["last_error"]) == ("failed", "endpoint removed")
    assert_one_line_error(
        cli(settings, "webhooks", "resend", str(failed)), code=1, mentions="removed"
    )
    assert_one_line_error(
        cli(settings, "webhooks", "remove", str(created["id"])), code=1, mentions="no webhook"
    )


# --- 6. the HTTP API --------------------------------------------------------------------------


async def test_the_webhook_routes(settings: Settings) -> None:
    admin = new_key(settings, "admin")["key"]
    reader = new_key(settings, "read")["key"]
    async with api_server(settings) as base, aiohttp.ClientSession() as session:
        hooks = f"{base}/v1/webhooks"
        body = {"url": "https://example.test/hook"}
        status, doc, _ = await call(session, "POST", hooks, body=body)
        assert (status, doc["error"]["code"]) == (401, "missing_api_key")
        status, doc, _ = await call(session, "GET", hooks, key="cl_live_" + "x" * 40)
        assert (status, doc["error"]["code"]) == (401, "invalid_api_key")
        status, doc, _ = await call(session, "POST", hooks, key=reader, body=body)
        assert (status, doc["error"]["code"]) == (403, "insufficient_scope")
        status, doc, _ = await call(session, "GET", hooks, key=reader)
        assert status == 403

        status, doc, _ = await call(session, "POST", hooks, key=admin, body=body)
        assert status == 201, doc
        created = doc["data"]
        secret = created["secret"]
        assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 24
        assert created["events"] is None and created["url"] == body["url"]
        status, doc, _ = await call(
            session, "POST", hooks, key=admin,
            body={"url": "http://127.0.0.1:9/x", "events": ["credit_balance_low"]},
        )  # fmt: skip
        assert status == 201 and doc["data"]["events"] == ["credit_balance_low"]
        other = doc["data"]["id"]

        status, doc, _ = await call(session, "GET", hooks, key=admin)
        assert status == 200
        assert [e["id"] for e in doc["data"]] == [other, created["id"]]  # newest first
        raw = orjson.dumps(doc).decode()
        assert "secret" not in raw and secret not in raw, "the secret is shown only at creation"

        for bad in (
            {"url": "ftp://example.test/x"},
            {"url": "http://"},
            {"url": "https://example.test/" + "a" * 2000},
            {"url": "https://example.test/x", "events": ["bogus"]},
            {"url": "https://example.test/x", "events": []},
            {"url": "https://example.test/x", "extra": 1},
            {"events": ["credit_balance_low"]},
        ):
            status, doc, _ = await call(session, "POST", hooks, key=admin, body=bad)
            assert (status, doc["error"]["code"]) == (422, "invalid_request"), (bad, doc)

        ids = [await _insert_delivery(settings, created["id"], "failed") for _ in range(3)]
        deliveries = f"{hooks}/deliveries"
        status, doc, _ = await call(session, "GET", f"{deliveries}?limit=2", key=admin)
        assert status == 200, doc
        assert [d["id"] for d in doc["data"]] == [ids[2], ids[1]]
        assert doc["meta"]["pagination"]["has_more"] is True
        cursor = doc["meta"]["pagination"]["cursor"]
        status, doc, _ = await call(
            session, "GET", f"{deliveries}?limit=2&cursor={cursor}", key=admin
        )
        assert [d["id"] for d in doc["data"]] == [ids[0]]
        assert doc["meta"]["pagination"] == {"cursor": None, "has_more": False}
        status, doc, _ = await call(
            session, "GET", f"{deliveries}?endpoint_id={other}&status=failed", key=admin
        )
        assert (status, doc["data"]) == (200, [])
        for query in ("status=nope", "endpoint_id=0", "cursor=nope!", "limit=0"):
            status, doc, _ = await call(session, "GET", f"{deliveries}?{query}", key=admin)
            assert status == 422, (query, doc)
        status, doc, _ = await call(session, "GET", deliveries, key=reader)
        assert status == 403

        resend = f"{base}/v1/webhook-deliveries/{ids[0]}/resend"
        status, doc, _ = await call(session, "POST", resend, key=reader)
        assert status == 403
        status, doc, _ = await call(session, "POST", resend, key=admin)
        assert status == 200, doc
        assert (doc["data"]["status"], doc["data"]["attempts"]) == ("pending", 0)
        status, doc, _ = await call(
            session, "POST", f"{base}/v1/webhook-deliveries/999999/resend", key=admin
        )
        assert (status, doc["error"]["code"]) == (404, "not_found")

        status, doc, _ = await call(session, "DELETE", f"{hooks}/{created['id']}", key=admin)
        assert status == 200 and doc["data"]["removed_at"] is not None
        assert "secret" not in doc["data"]
        status, doc, _ = await call(session, "DELETE", f"{hooks}/{created['id']}", key=admin)
        assert (status, doc["error"]["code"]) == (404, "not_found")
        status, doc, _ = await call(session, "POST", resend, key=admin)
        assert (status, doc["error"]["code"]) == (409, "endpoint_removed")
        status, doc, _ = await call(session, "GET", hooks, key=admin)
        assert [e["id"] for e in doc["data"]] == [other]
