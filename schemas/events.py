"""Input events: what producers publish on ``billing.charges`` and ``billing.usage``.

Parsing is one call into pydantic-core (``INPUT_EVENT.validate_json``), which reads the JSON
and validates it in Rust in one pass. The models are strict: unknown fields are refused, an
integer must be a JSON integer (``100.0``, ``"100"`` and ``true`` are not), and every
identifier is 1-200 printable characters. ``parse_event`` turns a refusal into
``EventRejected`` with a dead-letter reason code and a one-line detail.

The dedup key of an event is ``dedup_key``; its fingerprint (equal payloads, equal
fingerprints) is the sha256 of ``canonical_json``.
"""

from __future__ import annotations

import hashlib
from decimal import Decimal
from typing import Annotated, ClassVar, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from pydantic_core import ErrorDetails, PydanticCustomError

from schemas.common import (
    PRINTABLE_RULE,
    Amount,
    CostBasis,
    DeadLetterReason,
    Description,
    Identifier,
    Metadata,
    OccurredAt,
    Priority,
    Reason,
    Timestamp,
    Tokens,
    truncate,
)
from schemas.currency import CurrencyCode

EventKind = Literal["charge", "usage", "credit_grant", "credit_void"]
GrantSource = Literal["purchase", "plan", "promotional", "auto_reload", "manual"]


class ChargeEvent(BaseModel):
    """A final amount the producer already computed, charged through a flow
    (topic ``billing.charges``). Dedup key: (flow_id, reference)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    kind: ClassVar[EventKind] = "charge"
    # The fields of dedup_key, by name: read from records not yet validated
    # (workers/ingest/known.py).
    dedup_fields: ClassVar[tuple[str, str]] = ("flow_id", "reference")

    type: Literal["charge"]
    flow_id: Identifier = Field(description="The flow charged; it must exist. " + PRINTABLE_RULE)
    customer_ref: Identifier
    reference: Identifier
    amount: Amount
    currency: CurrencyCode
    metadata: Metadata | None = None
    occurred_at: OccurredAt | None = None

    @property
    def dedup_key(self) -> tuple[str, str]:
        """``(flow_id, reference)``."""
        return (self.flow_id, self.reference)


class UsageEvent(BaseModel):
    """Tokens consumed by a customer (topic ``billing.usage``).
    Dedup key: (customer_ref, reference) among usage events."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    kind: ClassVar[EventKind] = "usage"
    dedup_fields: ClassVar[tuple[str, str]] = ("customer_ref", "reference")

    type: Literal["usage"]
    customer_ref: Identifier
    reference: Identifier
    tokens: Tokens
    feature: Identifier | None = None
    occurred_at: OccurredAt | None = None
    metadata: Metadata | None = None

    @property
    def dedup_key(self) -> tuple[str, str]:
        """``(customer_ref, reference)``."""
        return (self.customer_ref, self.reference)


class CreditGrantEvent(BaseModel):
    """Tokens added to a customer's balance: a purchase, a plan allocation, a promotion, an
    auto-reload (topic ``billing.usage``). Dedup key: (customer_ref, reference) among grants."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    kind: ClassVar[EventKind] = "credit_grant"
    dedup_fields: ClassVar[tuple[str, str]] = ("customer_ref", "reference")

    type: Literal["credit_grant"]
    customer_ref: Identifier
    reference: Identifier
    tokens: Tokens
    cost_basis: CostBasis
    currency: CurrencyCode
    expires_at: Timestamp | None = Field(
        default=None,
        description="When the remainder expires (RFC 3339 with a time zone); "
        "omitted: never. Must be after effective_at when both are given.",
    )
    effective_at: Timestamp | None = Field(
        default=None,
        description="When the tokens become usable (RFC 3339 with a time zone); omitted: now.",
    )
    priority: Priority = 0
    source: GrantSource
    description: Description | None = None
    metadata: Metadata | None = None
    occurred_at: OccurredAt | None = None

    @model_validator(mode="after")
    def _expires_after_effective(self) -> CreditGrantEvent:
        if (
            self.expires_at is not None
            and self.effective_at is not None
            and self.expires_at <= self.effective_at
        ):
            raise PydanticCustomError(
                "expiry_before_effective", "expires_at should be after effective_at"
            )
        return self

    @property
    def dedup_key(self) -> tuple[str, str]:
        """``(customer_ref, reference)``."""
        return (self.customer_ref, self.reference)


class CreditVoidEvent(BaseModel):
    """Removes what is left of a grant, e.g. after a refund (topic ``billing.usage``).
    Dedup key: (customer_ref, reference) among voids."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    kind: ClassVar[EventKind] = "credit_void"
    dedup_fields: ClassVar[tuple[str, str]] = ("customer_ref", "reference")

    type: Literal["credit_void"]
    customer_ref: Identifier
    reference: Identifier
    grant_reference: Identifier = Field(
        description="The reference of the grant to void. " + PRINTABLE_RULE
    )
    reason: Reason
    occurred_at: OccurredAt | None = None
    metadata: Metadata | None = None

    @property
    def dedup_key(self) -> tuple[str, str]:
        """``(customer_ref, reference)``."""
        return (self.customer_ref, self.reference)


InputEvent = Annotated[
    ChargeEvent | UsageEvent | CreditGrantEvent | CreditVoidEvent,
    Field(discriminator="type"),
]
INPUT_EVENT: TypeAdapter[InputEvent] = TypeAdapter(InputEvent)

EVENT_MODELS: dict[str, type[ChargeEvent | UsageEvent | CreditGrantEvent | CreditVoidEvent]] = {
    model.kind: model for model in (ChargeEvent, UsageEvent, CreditGrantEvent, CreditVoidEvent)
}
"""The model of each ``type``."""


# --- Canonical form and fingerprint --------------------------------------------------------


def canonical_json(event: InputEvent) -> bytes:
    """The event as sent, after normalisation, as compact JSON with sorted keys.

    Fields left at their default (omitted, or sent as their default such as ``"priority": 0``
    or ``null``) are left out, so a re-send that means the same thing reads the same;
    currency is upper case, timestamps UTC, ``cost_basis`` without trailing zeros.

    The bytes are those of ``orjson.dumps(event.model_dump(mode="json",
    exclude_defaults=True), option=OPT_SORT_KEYS)``, the definition every stored fingerprint
    was made with (a unit test holds the two equal over generated events), built from the
    validated fields directly: pydantic's model_dump was a third of the parse cost. The
    fields need no conversion but timestamps, which are UTC (``"Z"``, as pydantic writes
    them), and ``cost_basis``, a plain decimal string.
    """
    defaults = _FIELD_DEFAULTS[type(event)]
    return orjson.dumps(
        {
            name: value
            for name, value in event.__dict__.items()
            if name not in defaults or value != defaults[name]
        },
        default=_plain_decimal,
        option=orjson.OPT_SORT_KEYS | orjson.OPT_UTC_Z,
    )


def _defaults(model: type[BaseModel]) -> dict[str, object]:
    return {name: f.default for name, f in model.model_fields.items() if not f.is_required()}


_FIELD_DEFAULTS: dict[type[BaseModel], dict[str, object]] = {
    model: _defaults(model) for model in EVENT_MODELS.values()
}


def _plain_decimal(value: object) -> str:
    if isinstance(value, Decimal):
        return format(value, "f")  # as schemas.common serializes cost_basis: never "1E-7"
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def fingerprint(event: InputEvent) -> bytes:
    """sha256 (32 bytes) of ``canonical_json(event)``: equal payloads, equal fingerprints."""
    return hashlib.sha256(canonical_json(event)).digest()


# --- Parsing ---------------------------------------------------------------------------------

MAX_DETAIL_ERRORS = 5
_MAX_LOC_PART = 64
_MAX_MESSAGE = 200


class EventRejected(Exception):
    """The record is not a valid input event.

    ``reason`` is a dead-letter reason code: ``parse_event`` raises ``invalid_json`` or
    ``invalid_event``; callers checking more (topic, key) may raise the other codes.
    """

    retriable = False

    def __init__(self, reason: DeadLetterReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: DeadLetterReason = reason
        self.detail = detail


def parse_event(raw: bytes | bytearray) -> InputEvent:
    """Parse and validate one record value; raise ``EventRejected`` if it is not an event.

    ``reason`` is ``invalid_json`` when the bytes are not JSON (or not UTF-8), else
    ``invalid_event``; ``detail`` is one readable line naming the offending fields.
    """
    try:
        return INPUT_EVENT.validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        reason: DeadLetterReason = (
            "invalid_json" if errors and errors[0]["type"] == "json_invalid" else "invalid_event"
        )
        raise EventRejected(reason, describe_errors(errors)) from None


def describe_errors(errors: list[ErrorDetails]) -> str:
    """One line for a pydantic error list: ``amount: Input should be ...; ammount: ...``."""
    # Unknown fields first: a typo such as "ammount" explains the "amount: Field required".
    ordered = sorted(errors, key=lambda error: error["type"] != "extra_forbidden")
    parts = [_describe(error) for error in ordered[:MAX_DETAIL_ERRORS]]
    more = len(errors) - MAX_DETAIL_ERRORS
    if more > 0:
        parts.append(f"and {more} more error{'s' if more > 1 else ''}")
    return truncate("; ".join(parts))


def _describe(error: ErrorDetails) -> str:
    loc = error["loc"]
    if loc and loc[0] in EVENT_MODELS:
        loc = loc[1:]  # the discriminated union puts the event type first
    where = ".".join(truncate(str(part), _MAX_LOC_PART) for part in loc)
    kind = error["type"]
    if kind == "union_tag_not_found":
        where, message = "type", f"Field required, one of {_EXPECTED_TYPES}"
    elif kind == "union_tag_invalid":
        tag = truncate(str(error.get("ctx", {}).get("tag", "")), _MAX_LOC_PART)
        where, message = "type", f"Unknown event type {tag!r}, expected one of {_EXPECTED_TYPES}"
    else:
        message = truncate(error["msg"], _MAX_MESSAGE)
    return f"{where}: {message}" if where else message


_EXPECTED_TYPES = ", ".join(EVENT_MODELS)
