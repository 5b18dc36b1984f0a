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


ENVELOPE_SCHEMA: dict[str, Any] = {
    "title": "Envelope",
    "type": "object",
    "required": ["data", "meta"],
    "properties": {
        "data": {"description": "The answer: an object, or a list of them for a list."},
        "meta": {
            "type": "object",
            "required": ["request_id", "timestamp"],
            "properties": {
                "request_id": {"type": "string"},
                "timestamp": {"type": "string"},
                "pagination": {
                    "type": "object",
                    "description": "Lists: the cursor of the next page, if there is one.",
                    "properties": {
                        "cursor": {"type": ["string", "null"]},
                        "has_more": {"type": "boolean"},
                    },
                },
            },
        },
    },
}
"""The body of every success answer, as ``ok`` writes it."""

# The answers any operation of a kind can give, whatever it does.
_KEYED = {
    "401": "No key, or an unknown or revoked one (missing_api_key, invalid_api_key).",
    "403": "The key lacks the operation's scope (insufficient_scope).",
}
_WITH_BODY = {
    "400": "The body is not JSON (invalid_json).",
    "413": "The body is over its limit (payload_too_large).",
    "422": "The body fails its model; param names the field.",
}
_WITH_PARAMETERS = {"422": "A parameter fails its type or range; param names it."}
_WITH_PATH_ID = {
    "404": "No such object (not_found, or the code the operation names), or a path that names "
    "none (an empty id). A customer is never unknown: one with no event yet reads as empty."
}
_ANY = {
    "503": "A dependency (Kafka, Postgres, Stripe) is unavailable: retry after Retry-After "
    "seconds (service_unavailable).",
}


def document_answers(document: dict[str, Any]) -> None:
    """Describe the answers in an OpenAPI ``document`` as they are sent: a success in the
    envelope; every error in the error envelope, in place of FastAPI's own validation error
    (``{"detail": [...]}``, which this API never sends: ``RequestValidationError`` is
    answered in the envelope); and the errors every operation of its kind can give (a keyed
    one 401 and 403, one with a body 400, 413 and 422, one with an id in its path 404, any
    503), which FastAPI cannot know of."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas["Error"] = ERROR_SCHEMA
    schemas["Envelope"] = ENVELOPE_SCHEMA
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    success = {"application/json": {"schema": {"$ref": "#/components/schemas/Envelope"}}}
    keyed_by_default = bool(document.get("security"))
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            parameters = operation.get("parameters", [])
            common = dict(_ANY)
            if operation.get("security", None if keyed_by_default else []) != []:
                common |= _KEYED
            if parameters:
                common |= _WITH_PARAMETERS
            if "requestBody" in operation:
                common |= _WITH_BODY
            if any(parameter["in"] == "path" for parameter in parameters):
                common |= _WITH_PATH_ID
            for status, description in common.items():
                responses.setdefault(status, {"description": description})
            for status, response in responses.items():
                schema = response.get("content", {}).get("application/json", {}).get("schema")
                if status.startswith(("4", "5")):
                    if schema is None or schema.get("$ref") == _FASTAPI_VALIDATION:
                        response["content"] = error
                    if status == "503":
                        response.setdefault("headers", {})["Retry-After"] = {
                            "description": "Seconds to wait before trying again.",
                            "schema": {"type": "integer"},
                        }
                elif status.startswith("2") and "content" not in response:
                    response["content"] = success
