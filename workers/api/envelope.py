"""The envelope of every answer: ``{"data", "meta"}`` on success, ``{"error", "meta"}`` on
failure, ``meta`` carrying the request id and the time; errors with a stable ``code``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response

from schemas.common import truncate


class ApiError(Exception):
    """An answer other than success: its status, type, stable code and message."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.error_type = error_type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}


_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    409: "conflict_error",
    413: "invalid_request_error",
    500: "api_error",
    503: "service_unavailable",
}


def meta(request: Request) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "request_id": request_id(request),
        "timestamp": f"{now:%Y-%m-%dT%H:%M:%S}.{now.microsecond // 1000:03d}Z",
    }


def request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", ""))


def ok(request: Request, data: Any, status: int = 200, **extra_meta: Any) -> Response:
    body = {"data": data, "meta": {**meta(request), **extra_meta}}
    return json_response(body, status)


def error(request: Request, exc: ApiError) -> Response:
    detail: dict[str, Any] = {
        "type": exc.error_type,
        "code": exc.code,
        "message": truncate(exc.message),
    }
    if exc.param is not None:
        detail["param"] = exc.param
    return json_response({"error": detail, "meta": meta(request)}, exc.status, exc.headers)


def json_response(body: Any, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body, default=_default, option=orjson.OPT_UTC_Z),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def _default(value: Any) -> Any:
    from decimal import Decimal
    from uuid import UUID

    if isinstance(value, Decimal | UUID):
        return str(value)
    if isinstance(value, bytes | memoryview):
        return bytes(value).hex()
    raise TypeError(f"cannot serialise {type(value).__name__}")


ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "required": ["error", "meta"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["type", "code", "message"],
            "properties": {
                "type": {"type": "string"},
                "code": {
                    "type": "string",
                    "description": "Stable; the dead-letter reason where one applies.",
                },
                "message": {"type": "string"},
                "param": {"type": "string", "description": "The field at fault, if one is."},
            },
        },
        "meta": {
            "type": "object",
            "required": ["request_id", "timestamp"],
            "properties": {"request_id": {"type": "string"}, "timestamp": {"type": "string"}},
        },
    },
}
"""The body of every error answer, as ``error`` writes it."""

_FASTAPI_VALIDATION = "#/components/schemas/HTTPValidationError"


def document_errors(document: dict[str, Any]) -> None:
    """Describe the error answers in an OpenAPI ``document`` as they are sent: every 4xx and
    5xx response gets the envelope's schema, in place of FastAPI's own validation error
    (``{"detail": [...]}``), which this API never sends (``RequestValidationError`` is
    answered in the envelope)."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas["Error"] = ERROR_SCHEMA
    envelope = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            for status, response in operation.get("responses", {}).items():
                if not status.startswith(("4", "5")):
                    continue
                schema = response.get("content", {}).get("application/json", {}).get("schema")
                if schema is None or schema.get("$ref") == _FASTAPI_VALIDATION:
                    response["content"] = envelope
