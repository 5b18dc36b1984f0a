"""Keys and scopes: ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``; no key or an unknown
or revoked one is 401, a key without the route's scope 403. Keys never reach a log.

Every route of a ``scoped_router(scope)`` checks its key before anything else of the
request is looked at (so a request without a key is 401 whatever else is wrong with it),
as a wrapper of the route's handler rather than a FastAPI dependency: the check runs on
every request of the hot path, and a dependency costs more to resolve than the check
itself. The OpenAPI document declares both schemes once, for every operation
(``security_schemes``).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute

from workers.api.envelope import ApiError
from workers.api.keys import Scope
from workers.api.services import Key, Services

SECURITY_SCHEMES: dict[str, Any] = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer KEY"},
    "apiKey": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "X-API-Key: KEY",
    },
}
"""For the OpenAPI document: either scheme admits a request."""
SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}]


def scoped_router(scope: Scope) -> APIRouter:
    """A router whose every route admits only a request whose key holds ``scope``."""

    class ScopedRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def authorized(request: Request) -> Response:
                request.state.key = await authenticate(request, scope)
                return await handler(request)

            return authorized

    return APIRouter(route_class=ScopedRoute)


def key_of(request: Request) -> Key:
    """The key the request was admitted with."""
    key: Key = request.state.key
    return key


async def authenticate(request: Request, scope: Scope) -> Key:
    presented = _presented(request)
    if presented is None:
        raise ApiError(
            401, "missing_api_key", "send a key: Authorization: Bearer KEY or X-API-Key: KEY"
        )
    services: Services = request.app.state.services
    key = await services.authenticate(presented)
    if key is None:
        raise ApiError(401, "invalid_api_key", "the key is unknown or revoked")
    if scope not in key.scopes:
        raise ApiError(403, "insufficient_scope", f"the key lacks the {scope!r} scope")
    return key


def _presented(request: Request) -> str | None:
    headers = request.headers
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    header = headers.get("x-api-key", "").strip()
    return header or None
