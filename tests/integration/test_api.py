"""The HTTP API against a real server over a real socket, with real Postgres and Kafka: a
charge recorded through it (and its duplicate and conflict, with ``Prefer: wait``), every
kind of bad request answered with its status and stable code and nothing published, a
batch with invalid items, keys and scopes, the OpenAPI document valid."""

from __future__ import annotations

import functools
from typing import Any

import aiohttp
import jsonschema
import orjson
from openapi_spec_validator import validate

from tests.support import (
    api_server,
    call,
    cli,
    fetchval,
    ingest_done,
    log_end_offsets,
    new_key,
    running_worker,
    setup_pipeline,
    wait_for,
)
from workers.settings import Settings

CHARGE = {"amount": 100, "currency": "EUR", "customer_ref": "user_123",
          "reference": "image-job-987", "metadata": {"job_id": "987"}}  # fmt: skip


async def test_a_charge_through_the_api_is_recorded_once(settings: Settings) -> None:
    await setup_pipeline(settings, partitions=2, flows=[("flow_123", "active")])
    key = new_key(settings, "ingest", "read")["key"]
    url_of = "{}/v1/flows/flow_123/charges".format
    async with (
        api_server(settings) as base,
        aiohttp.ClientSession() as session,
        running_worker(settings, "charges") as process,
    ):
        status, doc, _ = await call(session, "POST", url_of(base), key=key, body=CHARGE)
        assert status == 202, doc
        assert doc["data"] == {"flow_id": "flow_123", "reference": "image-job-987",
                                   "status": "accepted"}  # fmt: skip
        assert doc["meta"]["request_id"]
        await wait_for(functools.partial(ingest_done, process, 1), what="the charge")
        waited = {"Prefer": "wait=5"}
        second = {**CHARGE, "reference": "image-job-988"}
        status, doc, _ = await call(
            session, "POST", url_of(base), key=key, body=second, headers=waited
        )
        assert status == 201, doc
        assert doc["data"]["status"] == "recorded"
        assert doc["data"]["charge_id"] >= 1 and doc["data"]["recorded_at"]
        status, again, _ = await call(
            session, "POST", url_of(base), key=key, body=second, headers=waited
        )
        assert status == 200, again
        assert again["data"]["charge_id"] == doc["data"]["charge_id"]
        other = {**second, "amount": 101}
        status, conflict, _ = await call(
            session, "POST", url_of(base), key=key, body=other, headers=waited
        )
        assert status == 409, conflict
        assert conflict["error"]["code"] == "reference_conflict"
        status, shown, _ = await call(
            session, "GET", f"{base}/v1/charges/{doc['data']['charge_id']}", key=key
        )
        assert status == 200 and shown["data"]["reference"] == "image-job-988"
    assert await fetchval(settings, "SELECT count(*) FROM charges") == 2


async def test_bad_requests_get_their_status_and_code_and_publish_nothing(
    settings: Settings,
) -> None:
    await setup_pipeline(settings, partitions=2, flows=[("flow_a", "active"),
                                                        ("flow_p", "paused")])  # fmt: skip
    ingest = new_key(settings, "ingest")
    reader = new_key(settings, "read")
    revoked = new_key(settings, "ingest")
    done = cli(settings, "api-keys", "revoke", str(revoked["id"]), "--format", "json")
    assert done.returncode == 0, done.stderr
    before = await log_end_offsets(settings, settings.topic_charges)
    key = ingest["key"]
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("malformed JSON", {"data": b'{"amount": 1', "key": key}, 400, "invalid_json"),
        ("a float amount", {"body": {**CHARGE, "amount": 100.0}, "key": key}, 422,
         "invalid_event"),
        ("an unknown field", {"body": {**CHARGE, "ammount": 1}, "key": key}, 422,
         "invalid_event"),
        ("a bad currency", {"body": {**CHARGE, "currency": "XXX"}, "key": key}, 422,
         "invalid_event"),
        ("a 2 MiB body", {"data": b'{"a": "' + b"x" * (2 << 20) + b'"}', "key": key}, 413,
         "payload_too_large"),
        # Read exactly, not as the float 1.8446744073709552e+19: the model refuses it.
        ("metadata beyond 64 bits", {"data": orjson.dumps({**CHARGE, "metadata": 0})
         .replace(b"0}", b'{"n":18446744073709551616}}'), "key": key}, 422, "invalid_event"),
        ("Infinity", {"data": b'{"amount":1e400,"reference":"12345678901234567890"}',
         "key": key}, 400, "invalid_json"),
        ("no key", {"body": CHARGE}, 401, "missing_api_key"),
        ("a wrong key", {"body": CHARGE, "key": "cl_live_" + "a" * 40}, 401,
         "invalid_api_key"),
        ("a revoked key", {"body": CHARGE, "key": revoked["key"]}, 401, "invalid_api_key"),
        ("a key without the scope", {"body": CHARGE, "key": reader["key"]}, 403,
         "insufficient_scope"),
    ]  # fmt: skip
    async with api_server(settings) as base, aiohttp.ClientSession() as session:
        url = f"{base}/v1/flows/flow_a/charges"
        for what, options, want_status, want_code in cases:
            status, doc, _ = await call(session, "POST", url, **options)
            assert (status, doc["error"]["code"]) == (want_status, want_code), (what, doc)
            assert doc["meta"]["request_id"], what
        for flow, want_status, want_code in (("nope", 404, "unknown_flow"),
                                              ("flow_p", 409, "flow_paused")):  # fmt: skip
            status, doc, _ = await call(
                session, "POST", f"{base}/v1/flows/{flow}/charges", key=key, body=CHARGE
            )
            assert (status, doc["error"]["code"]) == (want_status, want_code), doc
        status, doc, _ = await call(session, "GET", f"{base}/v1/nowhere", key=key)
        assert (status, doc["error"]["code"]) == (404, "not_found")
        # A trailing slash is another route, not a redirect to one.
        status, doc, _ = await call(session, "GET", f"{base}/v1/flows/", key=reader["key"])
        assert (status, doc["error"]["code"]) == (404, "not_found")
        status, doc, _ = await call(session, "DELETE", url, key=key)
        assert (status, doc["error"]["code"]) == (405, "method_not_allowed")
        # The process keeps serving after all of that.
        status, doc, _ = await call(session, "GET", f"{base}/v1/flows", key=reader["key"])
        assert status == 200 and {f["flow_id"] for f in doc["data"]} == {"flow_a", "flow_p"}
    assert await log_end_offsets(settings, settings.topic_charges) == before
    listed = cli(settings, "api-keys", "list", "--format", "json")
    rows = {row["id"]: row for row in orjson.loads(listed.stdout)}
    assert rows[revoked["id"]]["revoked_at"] is not None
    assert all("key" not in row and "digest" not in row for row in rows.values())


async def test_a_batch_with_invalid_items_publishes_the_valid_ones(settings: Settings) -> None:
    await setup_pipeline(settings, partitions=3, flows=[("flow_a", "active")])
    key = new_key(settings, "ingest")["key"]
    events: list[Any] = []
    for n in range(990):
        kind = n % 3
        if kind == 0:
            events.append(
                {
                    "type": "charge",
                    "flow_id": "flow_a",
                    "customer_ref": f"c{n % 7}",
                    "reference": f"r{n}",
                    "amount": 5,
                    "currency": "EUR",
                }
            )
        elif kind == 1:
            events.append(
                {
                    "type": "credit_grant",
                    "customer_ref": f"c{n % 7}",
                    "reference": f"g{n}",
                    "tokens": 10,
                    "cost_basis": "0",
                    "currency": "USD",
                    "source": "plan",
                }
            )
        else:
            events.append({"type": "usage", "customer_ref": f"c{n % 7}",
                           "reference": f"u{n}", "tokens": 3})  # fmt: skip
    bad = [{"type": "usage"}, {"type": "charge", "flow_id": "nope", "customer_ref": "c",
           "reference": "x", "amount": 1, "currency": "EUR"}, 5, "text", {"type": "refund"},
           {"type": "usage", "customer_ref": "c", "reference": "f", "tokens": 1.5},
           {"type": "usage", "customer_ref": "c", "reference": "n", "tokens": -1},
           {"type": "usage", "customer_ref": "c", "reference": "e", "tokens": 1, "x": 1},
           {"type": "charge", "flow_id": "flow_a", "customer_ref": "c", "reference": "z",
            "amount": 1, "currency": "\u0131nr"}, []]  # fmt: skip
    positions = [17, 100, 230, 404, 500, 611, 700, 810, 900, 999]
    for position, item in zip(positions, bad, strict=True):
        events.insert(position, item)
    async with (
        api_server(settings) as base,
        aiohttp.ClientSession() as session,
        running_worker(settings, "charges", "usage") as process,
    ):
        status, doc, _ = await call(session, "POST", f"{base}/v1/events", key=key, body=events)
        assert status == 202, doc
        invalid = [r["index"] for r in doc["data"] if r["status"] == "invalid"]
        assert invalid == positions
        assert doc["meta"]["accepted"] == 990
        await wait_for(functools.partial(ingest_done, process, 990), what="990 events")
    assert await fetchval(settings, "SELECT count(*) FROM charges") == 330
    assert await fetchval(settings, "SELECT count(*) FROM grants") == 330
    assert await fetchval(settings, "SELECT count(*) FROM usage_events") == 330
    assert await fetchval(settings, "SELECT count(*) FROM dead_letters") == 0


async def test_the_openapi_document_is_valid_and_open(settings: Settings) -> None:
    await setup_pipeline(settings, partitions=1, flows=[("flow_a", "active")])
    key = new_key(settings, "ingest")["key"]
    async with api_server(settings) as base, aiohttp.ClientSession() as session:
        async with session.get(f"{base}/openapi.json") as response:
            assert response.status == 200
            document = orjson.loads(await response.read())
        async with session.get(f"{base}/docs") as response:
            assert response.status == 200
            assert "swagger" in (await response.text()).lower()
        refused = await call(session, "POST", f"{base}/v1/flows/flow_a/charges", key=key,
                             body={**CHARGE, "amount": 0})  # fmt: skip
    validate(document)
    # Every error answer is described as sent: the envelope, not FastAPI's {"detail": [...]}.
    assert "HTTPValidationError" not in orjson.dumps(document).decode()
    operation = document["paths"]["/v1/flows/{flow_id}/charges"]["post"]
    described = operation["responses"]["422"]["content"]["application/json"]["schema"]
    assert described == {"$ref": "#/components/schemas/Error"}
    assert refused[0] == 422
    jsonschema.validate(refused[1], document["components"]["schemas"]["Error"])
    # The answers any operation of its kind gives, which FastAPI cannot know of.
    assert {"400", "401", "403", "404", "413", "422", "503"} <= set(operation["responses"])
    hook = document["paths"]["/v1/stripe/webhooks"]["post"]["responses"]
    assert not {"401", "403"} & set(hook)  # no key there: Stripe signs it
    envelope = operation["responses"]["202"]["content"]["application/json"]["schema"]
    assert envelope == {"$ref": "#/components/schemas/Envelope"}
    assert "Prefer" in {parameter["name"] for parameter in operation["parameters"]}
    charge_body = document["paths"]["/v1/flows/{flow_id}/charges"]["post"]["requestBody"]
    schema = charge_body["content"]["application/json"]["schema"]
    assert set(schema["required"]) == {"customer_ref", "reference", "amount", "currency"}
    assert schema["additionalProperties"] is False
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer"}
    assert schemes["apiKey"]["name"] == "X-API-Key"
    assert document["security"] == [{"bearer": []}, {"apiKey": []}]


async def test_a_key_in_use_is_refused_once_its_revocation_returns(settings: Settings) -> None:
    """The API trusts a key it has checked for a moment without asking Postgres again;
    ``api-keys revoke`` outwaits that moment, so the very next request is refused."""
    await setup_pipeline(settings, partitions=1, flows=[])
    reader = new_key(settings, "read")
    async with api_server(settings) as base, aiohttp.ClientSession() as session:
        status, doc, _ = await call(session, "GET", f"{base}/v1/flows", key=reader["key"])
        assert status == 200, doc
        done = cli(settings, "api-keys", "revoke", str(reader["id"]), "--format", "json")
        assert done.returncode == 0, done.stderr
        status, doc, _ = await call(session, "GET", f"{base}/v1/flows", key=reader["key"])
        assert (status, doc["error"]["code"]) == (401, "invalid_api_key")


async def test_an_ndjson_batch_names_its_malformed_line_by_the_dead_letter_reason(
    settings: Settings,
) -> None:
    await setup_pipeline(settings, partitions=1)
    key = new_key(settings, "ingest")["key"]
    lines = [
        orjson.dumps({"type": "usage", "customer_ref": "c", "reference": "u1", "tokens": 1}),
        b'{"type": "usage", "customer_ref"',
        b"",  # blank lines are not items
        orjson.dumps({"type": "usage", "customer_ref": "c", "reference": "u2", "tokens": 2}),
    ]
    async with api_server(settings) as base, aiohttp.ClientSession() as session:
        status, doc, _ = await call(
            session, "POST", f"{base}/v1/events", key=key, data=b"\n".join(lines) + b"\n",
            headers={"Content-Type": "application/x-ndjson"},
        )  # fmt: skip
    assert status == 202, doc
    assert [item["status"] for item in doc["data"]] == ["accepted", "invalid", "accepted"]
    error = doc["data"][1]["error"]
    # The code a producer's dead letter would carry for the same bytes; no field to name.
    assert error["code"] == "invalid_json" and "param" not in error
    assert await log_end_offsets(settings, settings.topic_usage) == {0: 2}
