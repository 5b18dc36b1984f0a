"""The HTTP API while Postgres is frozen (SIGSTOP on the server and its backends): a read is
answered 503 with Retry-After within the API's statement deadline, not after the workers'
two minutes; the process stays up, and once Postgres is back (SIGCONT) the same read
answers 200, without a restart."""

from __future__ import annotations

import time

import aiohttp
import pytest

from tests.faults.harness import frozen
from tests.support import Stack, api_server, call, new_key, setup_pipeline, wait_for
from workers.api.services import STATEMENT_TIMEOUT_S
from workers.settings import Settings


async def test_a_read_is_503_soon_while_postgres_is_frozen_and_recovers(
    settings: Settings, stack: Stack
) -> None:
    if stack.local is None or stack.local.postgres.pid is None:
        pytest.skip("needs the embedded stack to freeze Postgres")
    await setup_pipeline(settings, partitions=1)
    key = new_key(settings, "read")["key"]
    async with api_server(settings) as base, aiohttp.ClientSession() as session:
        url = f"{base}/v1/customers/c1/credits"
        status, _, _ = await call(session, "GET", url, key=key)  # the key is now cached
        assert status == 200
        with frozen(stack.local.postgres.pid):
            started = time.monotonic()
            status, doc, headers = await call(session, "GET", url, key=key)
            waited = time.monotonic() - started
            assert (status, doc["error"]["code"]) == (503, "service_unavailable"), doc
            assert headers["Retry-After"] == "5"
            # The API's deadline and a margin for a busy machine: not the workers' two minutes.
            assert STATEMENT_TIMEOUT_S <= 15
            assert waited < 30, waited
            status, _, _ = await call(session, "GET", f"{base}/healthz")
            assert status == 200, "the process stays up"
            # Not ready, within its own deadline: a load balancer would stop sending.
            status, doc, _ = await call(session, "GET", f"{base}/readyz")
            assert (status, doc) == (503, {"ready": False, "postgres": False, "kafka": True})

        async def answers() -> bool:
            status, _, _ = await call(session, "GET", url, key=key)
            return status == 200

        await wait_for(answers, timeout=60, what="the API reading again")
        status, doc, _ = await call(session, "GET", f"{base}/readyz")
        assert (status, doc) == (200, {"ready": True, "postgres": True, "kafka": True})
