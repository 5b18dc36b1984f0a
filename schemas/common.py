"""Field types shared by the event models, and the limits they enforce.

Everything that pydantic-core can check by itself (types, lengths, ranges, patterns) is a
core constraint, checked in Rust while the JSON is parsed, and the same rule is stated in
the exported JSON Schema: printable identifiers (one frozen character set,
``schemas.printable``), free text without NUL, RFC 3339 timestamps, decimal strings,
currency codes. The few rules neither can express are small Python functions that run only
on the fields that need them:

- "not more than ``MAX_FUTURE_SKEW`` in the future" on ``occurred_at``, and an instant that
  stays within years 1-9999 once converted to UTC, short of their first and last instants;
- a calendar date that exists (2026-02-30 does not), left to ``datetime.fromisoformat``
  here and to ``format: date-time`` in the JSON Schema;
- the 8 KiB serialized size (and Postgres-storable content) of ``metadata``.

Each type's ``description`` spells those out for producers written in other languages.
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
    WithJsonSchema,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

from schemas import printable
from schemas.patterns import json_class, json_schema_pattern, rust_class

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


# --- Identifiers and free text: lengths and a character set, all checked in Rust --------------


class _Text:
    """Core schema: a JSON string of ``min_length`` to ``max_length`` characters whose
    characters all match a pattern (``rust`` in the worker, ``json`` in the JSON Schema).

    One string check, with one error stating the whole rule (``message``): pydantic's own
    message for the pattern would quote it, several kilobytes for printable text.
    """

    def __init__(
        self, *, min_length: int, max_length: int, rust: str, json: str, message: str
    ) -> None:
        self.min_length = min_length
        self.max_length = max_length
        self.rust = rust
        self.json = json
        self.message = message

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return core_schema.custom_error_schema(
            core_schema.str_schema(
                min_length=self.min_length,
                max_length=self.max_length,
                pattern=self.rust,
                strict=True,
            ),
            custom_error_type="string_rule",
            custom_error_message=self.message,
        )

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema: JsonSchemaValue = {"type": "string", "maxLength": self.max_length}
        if self.min_length:
            json_schema["minLength"] = self.min_length
        json_schema["pattern"] = self.json
        return json_schema


PRINTABLE_RULE = (
    "1-200 printable characters: no control characters (tab, newline, NUL...), format "
    "characters, surrogates, private-use or unassigned code points, or separators other "
    "than the ASCII space (what Python 3.11's str.isprintable accepts, Unicode 14.0)."
)

Identifier = Annotated[
    str,
    _Text(
        min_length=1,
        max_length=MAX_IDENTIFIER_LENGTH,
        rust=printable.RUST_PATTERN,
        json=printable.JSON_SCHEMA_PATTERN,
        message="Input should be a string of 1-200 printable characters (no control, format "
        "or separator characters other than the space)",
    ),
    Field(description=PRINTABLE_RULE),
]
"""1-200 printable characters: references, customer and flow ids, feature names."""

# Postgres text cannot hold U+0000. No string the worker accepts holds a surrogate (JSON
# with an unpaired one is refused as invalid_json): the JSON Schema says so too.
_NUL_AND_SURROGATES = ((0x0000, 0x0000), (0xD800, 0xDFFF))
_NO_NUL_RUST = f"^[^{rust_class(_NUL_AND_SURROGATES)}]*$"
_NO_NUL_JSON = json_schema_pattern(f"^[^{json_class(_NUL_AND_SURROGATES)}]*$")

Description = Annotated[
    str,
    _Text(
        min_length=0,
        max_length=MAX_TEXT_LENGTH,
        rust=_NO_NUL_RUST,
        json=_NO_NUL_JSON,
        message="Input should be a string of at most 500 characters, without NUL (U+0000)",
    ),
    Field(description="Free text, at most 500 characters, without NUL (U+0000)."),
]
Reason = Annotated[
    str,
    _Text(
        min_length=1,
        max_length=MAX_TEXT_LENGTH,
        rust=_NO_NUL_RUST,
        json=_NO_NUL_JSON,
        message="Input should be a string of 1-500 characters, without NUL (U+0000)",
    ),
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

# RFC 3339's grammar (section 5.6) with the ranges it states, less what a datetime cannot
# hold: year 0000 and the leap second 60. Whether the day exists in its month is left to
# fromisoformat (and to "format": "date-time" in the JSON Schema).
_YEAR = "(?:[0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)"
_MONTH = "(?:0[1-9]|1[0-2])"
_DAY = "(?:0[1-9]|[12][0-9]|3[01])"
_HOUR = "(?:[01][0-9]|2[0-3])"
_MINUTE = "[0-5][0-9]"
_SECOND = "[0-5][0-9]"
_FRACTION = r"(?:\.[0-9]{1,9})?"
_OFFSET = f"(?:[Zz]|[+-]{_HOUR}:{_MINUTE})"
RFC3339_PATTERN = f"^{_YEAR}-{_MONTH}-{_DAY}[Tt]{_HOUR}:{_MINUTE}:{_SECOND}{_FRACTION}{_OFFSET}$"


_FIRST_INSTANT = datetime.min.replace(tzinfo=UTC)
_LAST_INSTANT = datetime.max.replace(tzinfo=UTC)
_OUT_OF_RANGE = (
    "Datetime should fall after 0001-01-01T00:00:00Z and before 9999-12-31T23:59:59.999999Z "
    "once converted to UTC"
)


def _utc(value: datetime) -> datetime:
    # One instant, one form: "11:00:00+01:00" and "10:00:00Z" give the same fingerprint.
    if value.tzinfo is not UTC:
        try:
            value = value.astimezone(UTC)
        except OverflowError:
            # "0001-01-01T00:00:00+01:00" is year 0 in UTC, "9999-12-31T23:59:59-01:00"
            # year 10000: neither is a datetime Python can hold.
            raise PydanticCustomError("datetime_out_of_range", _OUT_OF_RANGE) from None
    if value in (_FIRST_INSTANT, _LAST_INSTANT):
        # The first and last instants a datetime holds are -infinity and infinity to the
        # Postgres driver: stored so, they would read back as other values (without a zone).
        raise PydanticCustomError("datetime_out_of_range", _OUT_OF_RANGE)
    return value


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

    From JSON, only a string in the RFC's grammar, every field within its range, is taken
    (checked in Rust; pydantic's own parser would also take "1700000000", "+0100" offsets or
    "_" separators, and fromisoformat "+05:60" offsets), then read by
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
                    "Input should be a valid date-time (no such day in that month)",
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
            "pattern": json_schema_pattern(RFC3339_PATTERN),
            "description": self.description,
        }


Timestamp = Annotated[
    datetime,
    _Rfc3339(
        _utc,
        "RFC 3339 date-time with a time zone (Z or +hh:mm), strictly between "
        "0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999999Z once converted to UTC.",
    ),
]
"""An RFC 3339 instant with an explicit offset, normalised to UTC."""

OccurredAt = Annotated[
    datetime,
    _Rfc3339(
        _not_in_future,
        "When it happened: RFC 3339 date-time with a time zone (Z or +hh:mm), at most 5 "
        "minutes in the future, strictly between 0001-01-01T00:00:00Z and "
        "9999-12-31T23:59:59.999999Z once converted to UTC. Optional: "
        "defaults to the Kafka record's timestamp.",
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
        return {"type": "string", "pattern": json_schema_pattern(COST_BASIS_PATTERN)}


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
