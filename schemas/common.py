"""Field types shared by the event models, and the limits they enforce.

Everything that pydantic-core can check by itself (types, lengths, ranges, patterns) is a
core constraint, checked in Rust while the JSON is parsed. The few rules it cannot express
are small Python functions that run only on the fields that need them:

- printable text (``str.isprintable``) on identifiers,
- "not more than ``MAX_FUTURE_SKEW`` in the future" on ``occurred_at``,
- the 8 KiB serialized size (and Postgres-storable content) of ``metadata``.

JSON Schema cannot express those three rules either, so each type's ``description`` spells
them out for producers written in other languages.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal, get_args

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    PlainSerializer,
    StringConstraints,
    WithJsonSchema,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

MAX_FUTURE_SKEW = timedelta(minutes=5)
"""How far in the future an ``occurred_at`` may be (clock skew between producers)."""

MAX_IDENTIFIER_LENGTH = 200
MAX_TEXT_LENGTH = 500
MAX_METADATA_BYTES = 8192
MAX_QUANTITY = 10**12
"""Upper bound of ``amount`` (minor units) and ``tokens``."""
MAX_COST_BASIS_DIGITS = 18
"""At most this many digits before and after the decimal point of ``cost_basis``."""
MAX_PRIORITY = 1000


# --- Identifiers: 1-200 printable characters ----------------------------------------------


def _printable(value: str) -> str:
    if value.isprintable():
        return value
    raise PydanticCustomError(
        "string_not_printable",
        "String should contain only printable characters (no control, format or "
        "separator characters other than the space)",
    )


PRINTABLE_RULE = (
    "1-200 printable characters: no control characters (tab, newline, NUL...), format "
    "characters, unassigned code points or separators other than the ASCII space "
    "(Python's str.isprintable)."
)

Identifier = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_IDENTIFIER_LENGTH),
    AfterValidator(_printable),
    Field(description=PRINTABLE_RULE),
]
"""1-200 printable characters: references, customer and flow ids, feature names."""


def _no_nul(value: str) -> str:
    if "\x00" not in value:
        return value
    raise PydanticCustomError("string_nul", "String should not contain NUL (U+0000) characters")


Description = Annotated[
    str,
    StringConstraints(max_length=MAX_TEXT_LENGTH),
    AfterValidator(_no_nul),
    Field(description="Free text, at most 500 characters, without NUL (U+0000)."),
]
Reason = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_TEXT_LENGTH),
    AfterValidator(_no_nul),
    Field(description="Free text, 1-500 characters, without NUL (U+0000)."),
]


# --- Quantities: JSON integers only (strict mode refuses 100.0, "100" and true) ----------------

Amount = Annotated[
    int,
    Field(
        ge=1,
        le=MAX_QUANTITY,
        description="A JSON integer in the currency's minor units, 1 to 10^12 "
        '(100.0, "100" and true are refused).',
    ),
]
Tokens = Annotated[
    int,
    Field(
        ge=1,
        le=MAX_QUANTITY,
        description="A JSON integer number of tokens, 1 to 10^12 "
        '(100.0, "100" and true are refused).',
    ),
]
Priority = Annotated[
    int,
    Field(
        ge=0,
        le=MAX_PRIORITY,
        description="A JSON integer 0-1000; among grants expiring at the same time, lower "
        "priority is consumed first.",
    ),
]


# --- Timestamps: RFC 3339 with an explicit offset ------------------------------------------

RFC3339_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?"
    r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})$"
)


def _utc(value: datetime) -> datetime:
    # One instant, one form: "11:00:00+01:00" and "10:00:00Z" give the same fingerprint.
    if value.tzinfo is UTC:
        return value
    try:
        return value.astimezone(UTC)
    except OverflowError:
        # "0001-01-01T00:00:00+01:00" is year 0 in UTC, "9999-12-31T23:59:59-01:00" year
        # 10000: neither is a datetime Python (or this contract) can hold.
        raise PydanticCustomError(
            "datetime_out_of_range",
            "Datetime should fall between 0001-01-01 and 9999-12-31 once converted to UTC",
        ) from None


def utc_now() -> datetime:
    """The clock ``occurred_at`` is checked against (tests pin it by replacing this)."""
    return datetime.now(UTC)


def _not_in_future(value: datetime) -> datetime:
    if value - utc_now() > MAX_FUTURE_SKEW:
        raise PydanticCustomError(
            "datetime_too_far_in_future",
            "Datetime should not be more than 5 minutes in the future",
        )
    return _utc(value)


class _Rfc3339:
    """Core schema: an RFC 3339 date-time with an offset, as an aware datetime in UTC.

    From JSON, only a string in the RFC's grammar is taken (checked in Rust; pydantic's own
    parser would also take "1700000000", "+0100" offsets or "_" separators), then read by
    ``datetime.fromisoformat``, which is quicker than pydantic's datetime for what follows:
    its ``timezone.utc`` is a C object, where pydantic's ``TzInfo`` calls back into Rust on
    every comparison. From Python, an aware ``datetime`` is taken too.
    """

    def __init__(self, finish: Callable[[datetime], datetime], description: str) -> None:
        self.finish = finish
        self.description = description

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        finish = self.finish

        def from_string(value: str) -> datetime:
            try:
                parsed = datetime.fromisoformat(value.upper())
            except ValueError:
                raise PydanticCustomError(
                    "datetime_from_string",
                    "Input should be a valid date-time (month, day, hour, minute, second or "
                    "offset out of range)",
                ) from None
            return finish(parsed)

        from_json = core_schema.no_info_after_validator_function(
            from_string,
            core_schema.custom_error_schema(
                core_schema.str_schema(pattern=RFC3339_PATTERN, strict=True),
                custom_error_type="rfc3339_datetime",
                custom_error_message="Input should be an RFC 3339 date-time with a time "
                "zone, such as 2026-11-22T10:00:00Z",
            ),
        )
        from_python = core_schema.union_schema(
            [
                core_schema.no_info_after_validator_function(
                    finish, core_schema.datetime_schema(strict=True, tz_constraint="aware")
                ),
                from_json,
            ],
            mode="left_to_right",
        )
        return core_schema.json_or_python_schema(
            json_schema=from_json,
            python_schema=from_python,
            serialization=core_schema.simple_ser_schema("datetime"),
        )

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {
            "type": "string",
            "format": "date-time",
            "pattern": RFC3339_PATTERN,
            "description": self.description,
        }


Timestamp = Annotated[
    datetime,
    _Rfc3339(_utc, "RFC 3339 date-time with a time zone (Z or +hh:mm)."),
]
"""An RFC 3339 instant with an explicit offset, normalised to UTC."""

OccurredAt = Annotated[
    datetime,
    _Rfc3339(
        _not_in_future,
        "When it happened: RFC 3339 date-time with a time zone (Z or +hh:mm), at most 5 "
        "minutes in the future. Optional: defaults to the Kafka record's timestamp.",
    ),
]
"""An RFC 3339 instant at most ``MAX_FUTURE_SKEW`` ahead of now, normalised to UTC."""


# --- metadata: a JSON object of at most 8 KiB ---------------------------------------------


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(_non_finite(v) for v in value)
    return False


def _check_metadata(value: dict[str, Any]) -> dict[str, Any]:
    try:
        serialized = orjson.dumps(value)
    except orjson.JSONEncodeError:
        # orjson refuses integers beyond 64 bits; so do most consumers of the payload.
        raise PydanticCustomError(
            "metadata_not_serializable",
            "Object should hold only integers within 64 bits",
        ) from None
    if len(serialized) > MAX_METADATA_BYTES:
        raise PydanticCustomError(
            "metadata_too_large",
            "Object should be at most 8192 bytes when serialized, not {size}",
            {"size": len(serialized)},
        )
    # NaN and Infinity parse (jiter accepts them) but serialize as null: find them only when
    # a null is there at all, so the common case costs one substring search.
    if b"null" in serialized and _non_finite(value):
        raise PydanticCustomError(
            "metadata_not_finite", "Object should not contain NaN or Infinity"
        )
    if b"\\u0000" in serialized:
        # Postgres jsonb and text cannot hold U+0000.
        raise PydanticCustomError("string_nul", "Object should not contain NUL (U+0000) characters")
    return value


Metadata = Annotated[
    dict[str, Any],
    AfterValidator(_check_metadata),
    Field(
        description="A JSON object, stored and shown as sent: at most 8192 bytes serialized "
        "compactly (UTF-8), integers within 64 bits, no NaN/Infinity, no U+0000."
    ),
]


# --- cost_basis: a decimal string, kept as Decimal -----------------------------------------

COST_BASIS_PATTERN = (
    rf"^(?:0|[1-9][0-9]{{0,{MAX_COST_BASIS_DIGITS - 1}}})(?:\.[0-9]{{1,{MAX_COST_BASIS_DIGITS}}})?$"
)


_COST_BASIS_RE = re.compile(COST_BASIS_PATTERN)


def _to_decimal(value: str) -> Decimal:
    # "0.00010" and "0.0001" are the same price: keep one form (and one fingerprint).
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return Decimal(value)


def _from_decimal(value: Decimal) -> Decimal:
    text = format(value, "f") if value.is_finite() else "NaN"
    if not _COST_BASIS_RE.match(text):
        raise PydanticCustomError("cost_basis", _COST_BASIS_MESSAGE)
    return _to_decimal(text)


def _format_decimal(value: Decimal) -> str:
    return format(value, "f")  # never exponent notation: str(Decimal("0.0000001")) is "1E-7"


_COST_BASIS_MESSAGE = (
    'Input should be a non-negative decimal string such as "0.0001" (no number, sign or '
    "exponent; at most 18 digits before and after the point)"
)


class _CostBasis:
    """Core schema: a decimal JSON string (never a JSON number, whose precision producers'
    float libraries lose), checked as a pattern in Rust, kept as ``Decimal``. From Python,
    a ``Decimal`` is taken too."""

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        from_json = core_schema.no_info_after_validator_function(
            _to_decimal,
            core_schema.custom_error_schema(
                core_schema.str_schema(pattern=COST_BASIS_PATTERN, strict=True),
                custom_error_type="cost_basis",
                custom_error_message=_COST_BASIS_MESSAGE,
            ),
        )
        from_python = core_schema.union_schema(
            [
                core_schema.no_info_after_validator_function(
                    _from_decimal, core_schema.is_instance_schema(Decimal)
                ),
                from_json,
            ],
            mode="left_to_right",
        )
        return core_schema.json_or_python_schema(
            json_schema=from_json,
            python_schema=from_python,
            serialization=core_schema.plain_serializer_function_ser_schema(
                _format_decimal, when_used="json"
            ),
        )

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "pattern": COST_BASIS_PATTERN}


CostBasis = Annotated[
    Decimal,
    _CostBasis(),
    Field(
        description="The price of one token in the currency's major unit, as a decimal "
        'string >= 0: "0.0001" is $10 per 100,000 tokens, "0" is free. At most 18 digits '
        "before and after the point."
    ),
]


# --- Dead letters ----------------------------------------------------------------------------

DeadLetterReason = Literal[
    "invalid_json",
    "invalid_event",
    "unknown_flow",
    "flow_paused",
    "reference_conflict",
    "payload_too_large",
    "key_mismatch",
    "wrong_topic",
    "unknown_grant",
    "unprocessable",
]
DEAD_LETTER_REASONS: tuple[DeadLetterReason, ...] = get_args(DeadLetterReason)
"""Every reason code a dead letter can carry (``chargeline.reason`` on ``billing.dlq``)."""


# --- Output timestamps ----------------------------------------------------------------------


def _format_millis(value: datetime) -> str:
    value = value.astimezone(UTC)
    return f"{value:%Y-%m-%dT%H:%M:%S}.{value.microsecond // 1000:03d}Z"


UtcMillis = Annotated[
    AwareDatetime,
    PlainSerializer(_format_millis, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time"}, mode="serialization"),
]
"""A timestamp chargeline emits: RFC 3339 in UTC with milliseconds, 2026-11-22T10:00:01.120Z."""


def truncate(text: str, limit: int = MAX_TEXT_LENGTH) -> str:
    """``text`` cut to at most ``limit`` characters, an ellipsis marking the cut."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"
