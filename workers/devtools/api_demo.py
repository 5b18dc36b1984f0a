"""The HTTP API in the demo of ``chargeline dev``: the API served beside the workers, a key
made for it, and the seed's one call (a charge through a flow, waiting for its verdict)."""

from __future__ import annotations

import asyncio
import socket
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
import uvicorn

from workers import db
from workers.api import keys
from workers.api.app import create_app
from workers.settings import Settings


@dataclass
class ApiDemo:
    """The HTTP API of the demo: its address, a key made for it, and the seed's call."""

    base: str
    key: str
    server: Any
    task: asyncio.Task[None]
    status: int = 0


async def start_api(settings: Settings) -> ApiDemo:
    """The API under uvicorn on CHARGELINE_API_PORT (another free port if it is taken), and
    a key with the ingest and read scopes."""
    port = settings.api_port
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            port = 0
    if port == 0:
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_config=None, access_log=False
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    new = keys.new_key()
    conn = await db.connect(settings.dsn)
    try:
        await conn.execute(
            db.QUERIES["api_key_create"],
            "chargeline dev",
            new.prefix,
            new.lookup,
            new.digest,
            ["ingest", "read"],
        )
    finally:
        await conn.close()
    # uvicorn says it has started with a flag, not an event.
    while not server.started and not task.done():  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    return ApiDemo(f"http://127.0.0.1:{port}", new.key, server, task)


SEED_CHARGE = {
    "amount": 100,
    "currency": "EUR",
    "customer_ref": "user_123",
    "metadata": {"job_id": "987", "source": "api-endpoint:/v1/images/transform"},
}


async def seed_call(api: ApiDemo) -> None:
    """The seed's one call: a charge through the flow, waiting for the worker's verdict."""
    body = {**SEED_CHARGE, "reference": f"image-job-{uuid.uuid4().hex[:8]}"}
    headers = {"Authorization": f"Bearer {api.key}", "Prefer": "wait=10"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{api.base}/v1/flows/flow_api/charges", json=body, headers=headers
        ) as response,
    ):
        api.status = response.status
        await response.read()
