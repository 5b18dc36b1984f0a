"""``chargeline api``: the application under uvicorn until SIGTERM, with its logs in
chargeline's format."""

from __future__ import annotations

import os
import socket

import uvicorn

from workers import db
from workers.api.app import create_app
from workers.errors import ConfigurationError
from workers.logs import get_logger
from workers.settings import Settings

log = get_logger("chargeline.api")


async def run_api(settings: Settings) -> int:
    # Both checked before uvicorn starts, so that each failure is one line naming its cause
    # (uvicorn would log a traceback from the application's start-up, or its own bind error).
    listening = _listen(settings.api_host, settings.api_port)
    try:
        await (await db.connect(settings.dsn)).close()
        config = uvicorn.Config(
            create_app(settings),
            log_config=None,  # chargeline's structlog configuration, not uvicorn's own
            access_log=False,  # requests are counted and their failures logged by the app
            lifespan="on",
            http="httptools",
            server_header=False,
        )
        server = uvicorn.Server(config)
        log.info("api_listening", host=settings.api_host, port=settings.api_port)
        await server.serve(sockets=[listening])
    finally:
        listening.close()
    return 0


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot listen on {host}:{port} (CHARGELINE_API_HOST, CHARGELINE_API_PORT): "
            f"{os.strerror(exc.errno) if exc.errno else exc}"
        ) from None
