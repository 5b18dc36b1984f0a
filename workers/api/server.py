"""``chargeline api``: the application under uvicorn until SIGTERM, with its logs in
chargeline's format."""

from __future__ import annotations

import uvicorn

from workers.api.app import create_app
from workers.logs import get_logger
from workers.settings import Settings

log = get_logger("chargeline.api")


async def run_api(settings: Settings) -> int:
    config = uvicorn.Config(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,  # chargeline's structlog configuration, not uvicorn's own
        access_log=False,  # requests are counted and their failures logged by the app
        lifespan="on",
        http="httptools",
        server_header=False,
    )
    server = uvicorn.Server(config)
    log.info("api_listening", host=settings.api_host, port=settings.api_port)
    await server.serve()
    return 0
