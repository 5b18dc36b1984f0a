"""The HTTP API fuzzed from its own OpenAPI document (schemathesis): every operation, with
generated and mutated requests, against a real `chargeline api` process on real Postgres
and Kafka. No answer may be a server error (a 503 would mean a dependency is down, which
it is not here), every answer is JSON in the envelope with a request id, and the process
keeps serving."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

from tests.support import free_port, settings_env
from workers import db
from workers.api import keys
from workers.settings import Settings

EXAMPLES = 300 if os.environ.get("CHARGELINE_DEEP_TESTS") == "1" else 25


@pytest.fixture
def api(settings: Settings) -> Iterator[tuple[str, str]]:
    """A `chargeline api` process on a free port, and a key with every scope."""
    import asyncio

    async def make_key() -> str:
        from tests.support import setup_pipeline

        await setup_pipeline(settings, partitions=1, flows=[("flow_a", "active")])
        new = keys.new_key()
        conn = await db.connect(settings.dsn)
        try:
            await conn.execute(db.QUERIES["api_key_create"], "fuzz", new.prefix, new.lookup,
                               new.digest, list(keys.SCOPES))  # fmt: skip
        finally:
            await conn.close()
        return new.key

    key = asyncio.run(make_key())
    port = free_port()
    env = {**os.environ, **settings_env(settings), "CHARGELINE_API_PORT": str(port),
           "CHARGELINE_API_HOST": "127.0.0.1", "CHARGELINE_LOG_FORMAT": "console",
           "CHARGELINE_STRIPE_WEBHOOK_SECRET": "whsec_fuzz"}  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "workers.cli.main", "api"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        else:
            raise AssertionError("the API did not become ready")
        yield base, key
        assert process.poll() is None, "the API process died"
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_no_request_makes_the_api_fail(api: tuple[str, str]) -> None:
    base, key = api
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    results = list(schema.get_all_operations())
    # An operation schemathesis cannot read is a defect of the document: none may be.
    assert all(isinstance(result, Ok) for result in results), results
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) >= 5
    with urllib.request.urlopen(f"{base}/openapi.json", timeout=5) as response:
        paths = orjson.loads(response.read())["paths"]
    seen: list[str] = []
    for operation in operations:
        # Generated requests, and requests mutated out of the document, for each operation.
        strategy = operation.as_strategy(generation_mode=GenerationMode.POSITIVE) | (
            operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)
        )

        @hypothesis_settings(
            max_examples=EXAMPLES, deadline=None, database=None,
            suppress_health_check=list(HealthCheck),
        )  # fmt: skip
        @given(case=strategy)
        def check(case: Any) -> None:
            response = case.call(
                base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=15
            )
            assert response.status_code < 500, (
                case.method, case.formatted_path, case.query, response.status_code,
                response.text[:300],
            )  # fmt: skip
            # Every answer is one the document describes for the operation (check() runs
            # within this iteration of the loop).
            responses = paths[operation.path]  # noqa: B023
            documented = responses[operation.method.lower()]["responses"]  # noqa: B023
            assert str(response.status_code) in documented, (
                case.method, case.formatted_path, response.status_code, sorted(documented),
            )  # fmt: skip
            document = orjson.loads(response.content)
            assert ("data" in document) != ("error" in document), document
            # schemathesis gives headers lower case, each a list of values.
            sent_id = response.headers.get("x-request-id", [None])[0]
            assert document["meta"]["request_id"] == sent_id, (
                case.method,
                case.formatted_path,
                response.status_code,
                dict(response.headers),
                response.text[:300],
            )
            if "error" in document:
                assert document["error"]["code"] and document["error"]["type"]

        check()
        seen.append(f"{operation.method.upper()} {operation.path}")
    print(f"{len(seen)} operations fuzzed, {EXAMPLES} examples each way: {seen}")
