"""Request bodies: read with a size limit (413 as soon as it is over), parsed as JSON, checked
against a model (422 naming the field). Ids in paths are checked by their type
(``workers.api.paging.Ref``)."""

from __future__ import annotations

import json
import math
import re
from typing import Any, TypeVar

import orjson
from fastapi import Request
from pydantic import BaseModel, ValidationError

from workers.api.envelope import ApiError

MAX_BODY_BYTES = 16 * 1024
"""Bodies of the admin and billing calls: a few fields each."""

ModelT = TypeVar("ModelT", bound=BaseModel)


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` describing a JSON body read by ``parse_body`` (not by FastAPI)."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


async def parse_body(request: Request, model: type[ModelT]) -> ModelT:
    """The body as ``model``: 413 over MAX_BODY_BYTES, 400 malformed JSON, 422 naming the
    first field that fails the model (extra fields included)."""
    data = json_object(await read_body(request, MAX_BODY_BYTES))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        message = f"{param}: {first['msg']}" if param else str(first["msg"])
        raise ApiError(422, "invalid_request", message, param=param) from None


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is over ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"the body is over {limit} bytes")


# orjson reads an integer beyond 64 bits as a float, silently. A body with a run of 19
# digits or more (perhaps inside a string) is read by the standard library instead, which
# keeps every integer exact: the event model then judges the number that was sent.
_LONG_DIGITS = re.compile(rb"[0-9]{19}")


def parse_json(raw: bytes) -> Any:
    """The body's JSON value, every number as sent; 400 ``invalid_json`` when it is not
    strict JSON (NaN, Infinity, a lone surrogate and a number too large for a double are
    not)."""
    try:
        if _LONG_DIGITS.search(raw) is None:
            return orjson.loads(raw)
        value = json.loads(raw, parse_constant=_not_json, parse_float=_finite)
        dump_json(value).decode()  # a lone surrogate: no UTF-8 can carry it
    except (ValueError, UnicodeError, RecursionError):  # orjson's error is a ValueError
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    return value


def dump_json(value: Any) -> bytes:
    """``value`` as compact JSON; integers beyond 64 bits (which orjson refuses) kept."""
    try:
        return orjson.dumps(value)
    except TypeError:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return text.encode("utf-8", "surrogatepass")


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def _finite(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise ValueError(f"{text} is too large for a double")
    return number


def json_object(raw: bytes, *, not_an_object: str = "invalid_request") -> dict[str, Any]:
    """The body as a JSON object: 400 ``invalid_json`` when it is not JSON, 422 with the
    code ``not_an_object`` when it is JSON but no object."""
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise ApiError(422, not_an_object, "the body should be a JSON object")
    return body
