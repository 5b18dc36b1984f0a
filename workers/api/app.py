"""The HTTP API's application: its services (a Postgres pool, a Kafka producer, the flow
cache, the verdict waiter, the key store), the request id and metrics of every request, the
error envelope for everything that goes wrong, and the routes.

``create_app`` only composes; ``workers.api.server`` runs it under uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from workers import db
from workers.api.auth import SECURITY, SECURITY_SCHEMES
from workers.api.envelope import ApiError, document_answers, error, json_response
from workers.api.segments import keep_encoded_slashes
from workers.api.services import Services
from workers.logs import get_logger
from workers.metrics import Metrics
from workers.settings import Settings

log = get_logger("chargeline.api")
_REQUEST_ID_HEADER = b"x-request-id"


def create_app(settings: Settings, metrics: Metrics | None = None) -> FastAPI:
    from workers.api import admin, billing, customers, ingest, reads, stripe_webhooks, webhooks

    metrics = metrics if metrics is not None else Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = Services(settings, metrics)
        app.state.services = services
        await services.start()
        # What was loaded to get here (modules, the OpenAPI models, the routes) lives as long
        # as the process: out of the collector's sight, a full collection looks only at what
        # requests made, and no longer stalls every request in flight for tens of ms.
        gc.freeze()
        try:
            yield
        finally:
            await services.stop()

    app = FastAPI(
        title="chargeline",
        version="0.1.0",
        summary="Record charges and usage, read credits and usage: the HTTP API of chargeline.",
        lifespan=lifespan,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
        default_response_class=Response,
        # An unknown route is a 404, with or without a trailing slash: no redirect to guess.
        redirect_slashes=False,
        # Requests are counted and timed in Prometheus by Observe; FastAPI's OpenTelemetry
        # hooks would only cost a check per request.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    _declare_security(app)
    app.state.metrics = metrics
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(Observe, metrics=metrics)
    app.include_router(ingest.router)
    app.include_router(reads.router)
    app.include_router(customers.router)
    app.include_router(admin.router)
    app.include_router(billing.router)
    app.include_router(stripe_webhooks.router)
    app.include_router(webhooks.router)
    _add_operational_routes(app, metrics)
    return app


def _declare_security(app: FastAPI) -> None:
    """Both key schemes in the OpenAPI document, required by every operation it lists (the
    check itself is the routers', ``workers.api.auth``), and the error answers described as
    they are sent."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = FastAPI.openapi(app)
            document.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
            document["security"] = SECURITY
            document_answers(document)
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]


class Observe:
    """A request id for every answer and log line; every request counted by route.

    Plain ASGI rather than ``BaseHTTPMiddleware``: the request runs in the server's task,
    with no second task, stream or copy of the response per request.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id_of(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        keep_encoded_slashes(scope)
        started = time.monotonic()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", ()),
                    (_REQUEST_ID_HEADER, request_id.encode()),
                ]
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            except Exception as exc:  # what the handlers did not turn into an answer
                if status:  # the answer had begun: nothing more can be sent
                    raise
                response = await _unexpected(Request(scope), exc)
                await response(scope, receive, send_with_id)
            matched = scope.get("route")
            # path_format: the path as documented, without its parameters' convertors.
            route = getattr(matched, "path_format", None) or getattr(matched, "path", None)
            route = route or "unmatched"
            self.metrics.http_requests.labels(
                route=route, method=scope["method"], status=str(status)
            ).inc()
            self.metrics.http_request_duration.labels(route=route).observe(
                time.monotonic() - started
            )
            if status >= 500:
                log.warning("http_request", route=route, method=scope["method"], status=status)


def _request_id_of(scope: Scope) -> str:
    """The caller's X-Request-Id when it is a sane one, else a new id."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            sent: str = value.decode("latin-1")
            if 0 < len(sent) <= 100 and sent.isascii() and sent.isprintable():
                return sent
            break
    return f"req_{uuid.uuid4().hex}"


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error(request, exc)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(part) for part in first.get("loc", ()) if part not in ("query", "path", "body")]
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg', 'invalid')}" if param else "invalid request"
    return error(request, ApiError(422, "invalid_request", message, param=param))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        return error(request, ApiError(404, "not_found", f"no route {request.url.path}"))
    if exc.status_code == 405:
        return error(
            request,
            ApiError(
                405,
                "method_not_allowed",
                f"{request.method} is not allowed here",
                headers=dict(exc.headers or {}),
            ),
        )
    return error(request, ApiError(exc.status_code, "http_error", str(exc.detail)))


async def _unexpected(request: Request, exc: Exception) -> Response:
    if db.is_transient(exc) or _is_kafka_outage(exc):
        return error(
            request,
            ApiError(
                503,
                "service_unavailable",
                "a server chargeline depends on is unavailable; try again",
                headers={"Retry-After": "5"},
            ),
        )
    log.exception("http_request_failed", path=request.url.path)
    return error(request, ApiError(500, "internal_error", "the request failed; it is logged"))


def _is_kafka_outage(exc: BaseException) -> bool:
    from aiokafka.errors import KafkaError

    return isinstance(exc, KafkaError | asyncio.TimeoutError)


def _add_operational_routes(app: FastAPI, metrics: Metrics) -> None:
    @app.get("/metrics", include_in_schema=False)
    async def metrics_view() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", include_in_schema=False)
    async def health() -> Response:
        return json_response({"status": "ok"}, 200)

    @app.get("/readyz", include_in_schema=False)
    async def ready(request: Request) -> Response:
        services: Services = request.app.state.services
        answering = await services.dependencies_answer()
        is_ready = all(answering.values())
        return json_response({"ready": is_ready, **answering}, 200 if is_ready else 503)


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services
