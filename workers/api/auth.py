"""Keys and scopes: ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``; no key or an unknown
or revoked one is 401, a key without the route's scope 403. Keys never reach a log."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request
from fastapi.security import APIKeyHeader, HTTPBearer

from workers.api.envelope import ApiError
from workers.api.keys import Scope
from workers.api.services import Key, Services

# Declared for the OpenAPI document (its security schemes); the check itself is below.
BEARER = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY")
API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: KEY")


def require(scope: Scope) -> Callable[[Request], Awaitable[Key]]:
    """A dependency that admits a request whose key holds ``scope``."""

    async def check(request: Request) -> Key:
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

    return check


def _presented(request: Request) -> str | None:
    authorization = request.headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    header = request.headers.get("x-api-key", "").strip()
    return header or None
