"""Input events: the SPEC examples parse, every rule of SPEC section 3 refuses what it should
with the right dead-letter reason, and fingerprints tell payloads apart exactly."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, TypeVar

import orjson
import pytest
from pydantic import ValidationError

import schemas.common
from schemas.common import MAX_FUTURE_SKEW
from schemas.currency import (
    ACTIVE_CURRENCIES,
    minor_unit_exponent,
    normalise_currency,
)
from schemas.events import (
    INPUT_EVENT,
    ChargeEvent,
    CreditGrantEvent,
    CreditVoidEvent,
    EventRejected,
    UsageEvent,
    canonical_json,
    fingerprint,
    parse_event,
)

EventT = TypeVar("EventT", ChargeEvent, UsageEvent, CreditGrantEvent, CreditVoidEvent)
NOW = datetime(2026, 11, 22, 10, 5, tzinfo=UTC)


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Pin "now" so the SPEC examples' fixed times never drift into the future."""
    monkeypatch.setattr(schemas.common, "utc_now", lambda: NOW)
    yield


# The examples of SPEC section 3, verbatim.
SPEC_CHARGE = b"""{"type": "charge", "flow_id": "flow_123", "customer_ref": "user_123",
 "reference": "image-job-987", "amount": 100, "currency": "EUR",
 "metadata": {"job_id": "987", "source": "api-endpoint:/v1/images/transform"},
 "occurred_at": "2026-11-22T10:00:00Z"}"""
SPEC_USAGE = b"""{"type": "usage", "customer_ref": "user_123", "reference": "req-abc",
 "tokens": 1532, "feature": "chat-completions", "occurred_at": "2026-11-22T10:00:01Z"}"""
SPEC_GRANT = b"""{"type": "credit_grant", "customer_ref": "user_123", "reference": "purchase-789",
 "tokens": 100000, "cost_basis": "0.0001", "currency": "USD",
 "expires_at": "2027-11-22T00:00:00Z", "priority": 0, "source": "purchase",
 "description": "100K tokens"}"""
SPEC_VOID = b"""{"type": "credit_void", "customer_ref": "user_123", "reference": "refund-1",
 "grant_reference": "purchase-789", "reason": "refunded"}"""

CHARGE: dict[str, Any] = orjson.loads(SPEC_CHARGE)
USAGE: dict[str, Any] = orjson.loads(SPEC_USAGE)
GRANT: dict[str, Any] = orjson.loads(SPEC_GRANT)
VOID: dict[str, Any] = orjson.loads(SPEC_VOID)
BASES = {"charge": CHARGE, "usage": USAGE, "credit_grant": GRANT, "credit_void": VOID}


def event(base: dict[str, Any], **changes: Any) -> bytes:
    """``base`` with fields changed (a value of ``...`` removes the field), as JSON bytes."""
    body = {**base, **changes}
    return orjson.dumps({k: v for k, v in body.items() if v is not ...})


def with_raw(base: dict[str, Any], field: str, raw_value: str) -> bytes:
    """``base`` with ``field`` set to a raw JSON fragment (for 1e2, NaN, ...)."""
    body = {**base, field: "__RAW__"}
    return orjson.dumps(body).replace(b'"__RAW__"', raw_value.encode())


def parse_as(raw: bytes, model: type[EventT]) -> EventT:
    parsed = parse_event(raw)
    assert isinstance(parsed, model)
    return parsed


def rejected(raw: bytes) -> EventRejected:
    with pytest.raises(EventRejected) as info:
        parse_event(raw)
    return info.value


def assert_invalid(raw: bytes, *fragments: str) -> EventRejected:
    exc = rejected(raw)
    assert exc.reason == "invalid_event", exc.detail
    for fragment in fragments:
        assert fragment in exc.detail
    return exc


# --- The SPEC examples ---------------------------------------------------------------------


def test_spec_charge_parses() -> None:
    charge = parse_event(SPEC_CHARGE)
    assert isinstance(charge, ChargeEvent)
    assert (charge.flow_id, charge.customer_ref, charge.reference) == (
        "flow_123",
        "user_123",
        "image-job-987",
    )
    assert (charge.amount, charge.currency) == (100, "EUR")
    assert charge.metadata == {"job_id": "987", "source": "api-endpoint:/v1/images/transform"}
    assert charge.occurred_at == datetime(2026, 11, 22, 10, tzinfo=UTC)
    assert charge.kind == "charge"
    assert charge.dedup_key == ("flow_123", "image-job-987")


def test_spec_usage_parses() -> None:
    usage = parse_event(SPEC_USAGE)
    assert isinstance(usage, UsageEvent)
    assert (usage.tokens, usage.feature) == (1532, "chat-completions")
    assert usage.metadata is None
    assert usage.kind == "usage"
    assert usage.dedup_key == ("user_123", "req-abc")


def test_spec_grant_parses() -> None:
    grant = parse_event(SPEC_GRANT)
    assert isinstance(grant, CreditGrantEvent)
    assert grant.cost_basis == Decimal("0.0001")
    assert isinstance(grant.cost_basis, Decimal)
    assert grant.expires_at == datetime(2027, 11, 22, tzinfo=UTC)
    assert grant.effective_at is None
    assert (grant.priority, grant.source, grant.description) == (0, "purchase", "100K tokens")
    assert grant.kind == "credit_grant"
    assert grant.dedup_key == ("user_123", "purchase-789")


def test_spec_void_parses() -> None:
    void = parse_event(SPEC_VOID)
    assert isinstance(void, CreditVoidEvent)
    assert (void.grant_reference, void.reason) == ("purchase-789", "refunded")
    assert void.kind == "credit_void"
    assert void.dedup_key == ("user_123", "refund-1")


def test_minimal_events_parse() -> None:
    usage = parse_event(b'{"type":"usage","customer_ref":"c","reference":"r","tokens":1}')
    assert isinstance(usage, UsageEvent)
    assert usage.occurred_at is None
    assert usage.feature is None


def test_input_event_adapter_is_the_parser() -> None:
    assert INPUT_EVENT.validate_json(SPEC_USAGE) == parse_event(SPEC_USAGE)


def test_events_are_frozen() -> None:
    usage = parse_as(SPEC_USAGE, UsageEvent)
    with pytest.raises(ValidationError):
        usage.tokens = 5  # type: ignore[misc]  # frozen: mypy agrees it is read-only


# --- Integers are JSON integers --------------------------------------------------------------

NOT_INTEGERS = ["100.0", '"100"', "true", "false", "1e2", "100.5", "null", "[100]", '{"v":1}']


@pytest.mark.parametrize("raw_value", NOT_INTEGERS)
@pytest.mark.parametrize(
    ("base", "field"),
    [(CHARGE, "amount"), (USAGE, "tokens"), (GRANT, "tokens"), (GRANT, "priority")],
)
def test_integers_must_be_json_integers(base: dict[str, Any], field: str, raw_value: str) -> None:
    assert_invalid(with_raw(base, field, raw_value), f"{field}: ")


def test_float_amount_detail_is_readable() -> None:
    exc = assert_invalid(with_raw(CHARGE, "amount", "100.0"))
    assert exc.detail == "amount: Input should be a valid integer"


@pytest.mark.parametrize("value", [0, -1, -(10**12), 10**12 + 1, 2**63, 10**30])
@pytest.mark.parametrize(
    ("base", "field"), [(CHARGE, "amount"), (USAGE, "tokens"), (GRANT, "tokens")]
)
def test_quantities_out_of_range(base: dict[str, Any], field: str, value: int) -> None:
    assert_invalid(with_raw(base, field, str(value)), f"{field}: ")


@pytest.mark.parametrize("value", [1, 10**12])
@pytest.mark.parametrize(
    ("base", "field"), [(CHARGE, "amount"), (USAGE, "tokens"), (GRANT, "tokens")]
)
def test_quantities_in_range(base: dict[str, Any], field: str, value: int) -> None:
    assert getattr(parse_event(event(base, **{field: value})), field) == value


@pytest.mark.parametrize(("value", "ok"), [(0, True), (1000, True), (-1, False), (1001, False)])
def test_priority_range(value: int, ok: bool) -> None:
    raw = event(GRANT, priority=value)
    if ok:
        assert parse_as(raw, CreditGrantEvent).priority == value
    else:
        assert_invalid(raw, "priority: ")


# --- Unknown fields ------------------------------------------------------------------------


@pytest.mark.parametrize("base", BASES.values(), ids=list(BASES))
def test_unknown_fields_are_refused(base: dict[str, Any]) -> None:
    assert_invalid(event(base, ammount=100), "ammount: Extra inputs are not permitted")


def test_typo_is_named_before_the_missing_field() -> None:
    exc = assert_invalid(event(CHARGE, amount=..., ammount=100))
    assert exc.detail == "ammount: Extra inputs are not permitted; amount: Field required"


def test_two_errors_in_one_line() -> None:
    exc = assert_invalid(with_raw({**CHARGE, "ammount": 1}, "amount", "100.0"))
    assert exc.detail == (
        "ammount: Extra inputs are not permitted; amount: Input should be a valid integer"
    )


@pytest.mark.parametrize(
    ("base", "field"),
    [
        (CHARGE, "flow_id"),
        (CHARGE, "customer_ref"),
        (CHARGE, "reference"),
        (CHARGE, "amount"),
        (CHARGE, "currency"),
        (USAGE, "customer_ref"),
        (USAGE, "reference"),
        (USAGE, "tokens"),
        (GRANT, "tokens"),
        (GRANT, "cost_basis"),
        (GRANT, "currency"),
        (GRANT, "source"),
        (VOID, "grant_reference"),
        (VOID, "reason"),
    ],
)
def test_required_fields(base: dict[str, Any], field: str) -> None:
    assert_invalid(event(base, **{field: ...}), f"{field}: Field required")


# --- Currency ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code", ["XAU", "XTS", "XXX", "XDR", "ZZZ", "EU", "EURO", "", " EUR", "€", "eu r"]
)
@pytest.mark.parametrize("base", [CHARGE, GRANT], ids=["charge", "credit_grant"])
def test_bad_currency(base: dict[str, Any], code: str) -> None:
    assert_invalid(event(base, currency=code), "currency: ", "ISO 4217")


@pytest.mark.parametrize("raw_value", ["978", "null", "true", '["EUR"]'])
def test_currency_must_be_a_string(raw_value: str) -> None:
    assert_invalid(with_raw(CHARGE, "currency", raw_value), "currency: ")


@pytest.mark.parametrize(("code", "expected"), [("eur", "EUR"), ("Eur", "EUR"), ("jpy", "JPY")])
@pytest.mark.parametrize("base", [CHARGE, GRANT], ids=["charge", "credit_grant"])
def test_currency_is_normalised(base: dict[str, Any], code: str, expected: str) -> None:
    parsed = parse_event(event(base, currency=code))
    assert isinstance(parsed, ChargeEvent | CreditGrantEvent)
    assert parsed.currency == expected


def test_currency_table() -> None:
    assert {"EUR", "USD", "JPY", "KWD", "CHF", "GBP"} <= ACTIVE_CURRENCIES
    assert not {"XAU", "XAG", "XTS", "XXX", "XDR"} & ACTIVE_CURRENCIES
    assert all(code.isupper() and len(code) == 3 for code in ACTIVE_CURRENCIES)
    assert (minor_unit_exponent("JPY"), minor_unit_exponent("EUR")) == (0, 2)
    assert minor_unit_exponent("KWD") == 3
    assert minor_unit_exponent("kwd") == 3
    assert normalise_currency("usd") == "USD"
    for bad in ("XAU", "ZZZ", "", "EURO"):
        with pytest.raises(ValueError, match="ISO 4217"):
            normalise_currency(bad)


# --- occurred_at and other timestamps ------------------------------------------------------

BAD_TIMESTAMPS = [
    "2026-11-22T10:00:00",  # naive
    "2026-11-22 10:00:00",  # naive
    "2026-11-22",  # date only
    "1700000000",  # a number in a string
    "2026-11-22T10:00:00+0100",  # not RFC 3339's offset form
    "2026-11-22T10:00Z",  # no seconds
    "2026-11-22_10:00:00Z",
    "2026-02-30T10:00:00Z",  # no such day
    "2026-11-22T25:00:00Z",
    "2026-11-22T10:00:00+24:00",
    "",
    "yesterday",
]


@pytest.mark.parametrize("value", BAD_TIMESTAMPS)
@pytest.mark.parametrize("base", BASES.values(), ids=list(BASES))
def test_bad_occurred_at(base: dict[str, Any], value: str) -> None:
    assert_invalid(event(base, occurred_at=value), "occurred_at: ")


@pytest.mark.parametrize("raw_value", ["1700000000", "1700000000.5", "true", "[]"])
def test_occurred_at_must_be_a_string(raw_value: str) -> None:
    assert_invalid(with_raw(USAGE, "occurred_at", raw_value), "occurred_at: ")


@pytest.mark.parametrize("value", BAD_TIMESTAMPS)
@pytest.mark.parametrize("field", ["expires_at", "effective_at"])
def test_bad_grant_timestamps(field: str, value: str) -> None:
    assert_invalid(event(GRANT, **{field: value}), f"{field}: ")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-22T10:00:00Z", datetime(2026, 11, 22, 10, tzinfo=UTC)),
        ("2026-11-22t10:00:00z", datetime(2026, 11, 22, 10, tzinfo=UTC)),
        ("2026-11-22T11:00:00+01:00", datetime(2026, 11, 22, 10, tzinfo=UTC)),
        ("2026-11-22T05:00:00-05:00", datetime(2026, 11, 22, 10, tzinfo=UTC)),
        ("2026-11-22T10:00:00.25Z", datetime(2026, 11, 22, 10, 0, 0, 250000, tzinfo=UTC)),
        ("2026-11-22T10:00:00.123456789Z", datetime(2026, 11, 22, 10, 0, 0, 123456, tzinfo=UTC)),
    ],
)
def test_occurred_at_is_utc(value: str, expected: datetime) -> None:
    occurred_at = parse_event(event(USAGE, occurred_at=value)).occurred_at
    assert occurred_at == expected
    assert occurred_at is not None
    assert occurred_at.tzinfo is UTC


def _rfc3339(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


@pytest.mark.parametrize("base", BASES.values(), ids=list(BASES))
def test_future_occurred_at(base: dict[str, Any]) -> None:
    too_late = NOW + MAX_FUTURE_SKEW + timedelta(seconds=1)
    assert_invalid(event(base, occurred_at=_rfc3339(too_late)), "occurred_at: ", "future")
    just_in = NOW + MAX_FUTURE_SKEW
    assert parse_event(event(base, occurred_at=_rfc3339(just_in))).occurred_at == just_in


def test_future_check_uses_the_real_clock_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()
    soon = datetime.now(UTC) + timedelta(minutes=1)
    later = datetime.now(UTC) + timedelta(minutes=10)
    assert parse_event(event(USAGE, occurred_at=_rfc3339(soon))).occurred_at is not None
    assert_invalid(event(USAGE, occurred_at=_rfc3339(later)), "occurred_at: ")


def test_far_future_expiry_is_fine() -> None:
    grant = parse_as(event(GRANT, expires_at="2100-01-01T00:00:00Z"), CreditGrantEvent)
    assert grant.expires_at == datetime(2100, 1, 1, tzinfo=UTC)


# --- metadata -------------------------------------------------------------------------------


def _metadata_of_size(size: int) -> dict[str, str]:
    metadata = {"k": "x" * (size - len(b'{"k":""}'))}
    assert len(orjson.dumps(metadata)) == size
    return metadata


@pytest.mark.parametrize("base", BASES.values(), ids=list(BASES))
def test_metadata_8_kib_boundary(base: dict[str, Any]) -> None:
    fits = _metadata_of_size(8192)
    assert parse_event(event(base, metadata=fits)).metadata == fits
    exc = assert_invalid(event(base, metadata=_metadata_of_size(8193)), "metadata: ", "8192")
    assert "x" * 100 not in exc.detail


def test_metadata_size_counts_utf8_bytes() -> None:
    metadata = {"k": "é" * 4093}  # 8186 characters of JSON, 8194 bytes
    assert_invalid(event(USAGE, metadata=metadata), "metadata: ", "8192")


@pytest.mark.parametrize("raw_value", ["[1]", '"text"', "1", "true"])
def test_metadata_must_be_an_object(raw_value: str) -> None:
    assert_invalid(with_raw(USAGE, "metadata", raw_value), "metadata: ")


@pytest.mark.parametrize(
    "raw_value",
    [
        '{"v": NaN}',
        '{"v": Infinity}',
        '{"v": [1, {"w": -Infinity}]}',
        '{"v": 1e400}',
        '{"v": 123456789012345678901234567890}',
        '{"v": "a\\u0000b"}',
        '{"a\\u0000": 1}',
    ],
)
def test_metadata_must_be_storable(raw_value: str) -> None:
    assert_invalid(with_raw(USAGE, "metadata", raw_value), "metadata: ")


def test_metadata_is_kept_as_sent() -> None:
    metadata: dict[str, Any] = {
        "z": None,
        "a": [1, 2.5, "x", {"nested": True}],
        "empty": {},
        "n": -(2**63),
    }
    assert parse_event(event(USAGE, metadata=metadata)).metadata == metadata


# --- Identifiers ----------------------------------------------------------------------------

BAD_IDENTIFIERS = [
    "",
    "a" * 201,
    "line\nbreak",
    "tab\there",
    "nul\x00",
    "bell\x07",
    "del\x7f",
    "\u200b",  # zero-width space (format)
    "no\u00a0break",  # no-break space (separator)
    "line\u2028sep",
    "private\ue000",  # private use
]
GOOD_IDENTIFIERS = ["a", "a" * 200, "with space", "user_123@example.com", "日本語", "émoji-😀"]
IDENTIFIER_FIELDS = [
    (CHARGE, "flow_id"),
    (CHARGE, "customer_ref"),
    (CHARGE, "reference"),
    (USAGE, "customer_ref"),
    (USAGE, "reference"),
    (USAGE, "feature"),
    (GRANT, "customer_ref"),
    (GRANT, "reference"),
    (VOID, "customer_ref"),
    (VOID, "reference"),
    (VOID, "grant_reference"),
]
FIELD_IDS = [f"{base['type']}.{field}" for base, field in IDENTIFIER_FIELDS]


@pytest.mark.parametrize("value", BAD_IDENTIFIERS)
@pytest.mark.parametrize(("base", "field"), IDENTIFIER_FIELDS, ids=FIELD_IDS)
def test_bad_identifiers(base: dict[str, Any], field: str, value: str) -> None:
    assert_invalid(event(base, **{field: value}), f"{field}: ")


@pytest.mark.parametrize("value", GOOD_IDENTIFIERS)
@pytest.mark.parametrize(("base", "field"), IDENTIFIER_FIELDS, ids=FIELD_IDS)
def test_good_identifiers(base: dict[str, Any], field: str, value: str) -> None:
    assert getattr(parse_event(event(base, **{field: value})), field) == value


def test_identifier_rule_is_isprintable() -> None:
    for value in BAD_IDENTIFIERS[2:]:
        assert not value.isprintable()
    for value in GOOD_IDENTIFIERS:
        assert value.isprintable()


@pytest.mark.parametrize("raw_value", ["123", "null", "true", '["a"]'])
def test_identifiers_must_be_strings(raw_value: str) -> None:
    assert_invalid(with_raw(USAGE, "reference", raw_value), "reference: ")


def test_free_text_limits() -> None:
    for text in ("d" * 500, "two\nlines", ""):
        assert parse_as(event(GRANT, description=text), CreditGrantEvent).description == text
    assert_invalid(event(GRANT, description="d" * 501), "description: ")
    assert_invalid(event(GRANT, description="nul\x00"), "description: ")
    assert_invalid(event(VOID, reason=""), "reason: ")
    assert_invalid(event(VOID, reason="r" * 501), "reason: ")
    assert_invalid(event(VOID, reason="nul\x00"), "reason: ")


# --- credit_grant ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.0001", Decimal("0.0001")),
        ("0", Decimal("0")),
        ("12.5", Decimal("12.5")),
        ("12.50", Decimal("12.5")),
        ("0.000", Decimal("0")),
        ("1", Decimal("1")),
        ("0.000000000000000001", Decimal("1E-18")),
        ("999999999999999999.999999999999999999", Decimal("999999999999999999.999999999999999999")),
    ],
)
def test_cost_basis_accepted(value: str, expected: Decimal) -> None:
    grant = parse_event(event(GRANT, cost_basis=value))
    assert isinstance(grant, CreditGrantEvent)
    assert grant.cost_basis == expected
    assert str(grant.cost_basis) == str(expected)


@pytest.mark.parametrize(
    "value",
    [
        "-1",
        "-0",
        "+1",
        "1e-4",
        "1E3",
        "NaN",
        "Infinity",
        "",
        " 1",
        "1 ",
        ".5",
        "5.",
        "01",
        "1,5",
        "0x10",
        "0.0000000000000000001",  # 19 fractional digits
        "1000000000000000000",  # 19 integer digits
        "١٢",  # Arabic-Indic digits: Decimal() would take them
    ],
)
def test_cost_basis_refused(value: str) -> None:
    assert_invalid(event(GRANT, cost_basis=value), "cost_basis: ")


@pytest.mark.parametrize("raw_value", ["0.0001", "1", "0", "1e-4", "true", "null"])
def test_cost_basis_must_be_a_string(raw_value: str) -> None:
    assert_invalid(with_raw(GRANT, "cost_basis", raw_value), "cost_basis: ")


def test_cost_basis_serialises_without_exponent() -> None:
    grant = parse_event(event(GRANT, cost_basis="0.00000010"))
    assert b'"cost_basis":"0.0000001"' in canonical_json(grant)


@pytest.mark.parametrize("source", ["purchase", "plan", "promotional", "auto_reload", "manual"])
def test_grant_sources(source: str) -> None:
    assert parse_as(event(GRANT, source=source), CreditGrantEvent).source == source


@pytest.mark.parametrize("source", ["gift", "PURCHASE", ""])
def test_bad_grant_source(source: str) -> None:
    assert_invalid(event(GRANT, source=source), "source: ")


@pytest.mark.parametrize(
    ("effective_at", "expires_at"),
    [
        ("2026-12-01T00:00:00Z", "2026-11-30T00:00:00Z"),
        ("2026-12-01T00:00:00Z", "2026-12-01T00:00:00Z"),
        ("2026-12-01T00:00:00Z", "2026-12-01T00:30:00+01:00"),
    ],
)
def test_expiry_before_effective(effective_at: str, expires_at: str) -> None:
    exc = assert_invalid(event(GRANT, effective_at=effective_at, expires_at=expires_at))
    assert exc.detail == "expires_at should be after effective_at"


def test_expiry_after_effective() -> None:
    raw = event(GRANT, effective_at="2026-12-01T00:00:00Z", expires_at="2026-12-01T00:00:01Z")
    grant = parse_event(raw)
    assert isinstance(grant, CreditGrantEvent)
    assert grant.effective_at == datetime(2026, 12, 1, tzinfo=UTC)


def test_grant_built_in_python() -> None:
    """Workers (auto-reload) build grants from Python values, not JSON."""
    grant = CreditGrantEvent.model_validate(
        {
            "type": "credit_grant",
            "customer_ref": "user_123",
            "reference": "pi_123",
            "tokens": 100_000,
            "cost_basis": Decimal("0.00010"),
            "currency": "usd",
            "source": "auto_reload",
            "effective_at": datetime(2026, 11, 22, 11, tzinfo=UTC) + timedelta(hours=1),
        }
    )
    assert grant.cost_basis == Decimal("0.0001")
    assert grant.currency == "USD"
    assert canonical_json(grant) == canonical_json(
        parse_event(
            b'{"type":"credit_grant","customer_ref":"user_123","reference":"pi_123",'
            b'"tokens":100000,"cost_basis":"0.0001","currency":"USD","source":"auto_reload",'
            b'"effective_at":"2026-11-22T12:00:00Z"}'
        )
    )
    for bad in (Decimal("-1"), Decimal("NaN"), Decimal("1E-19"), 0.5, 1):
        with pytest.raises(ValidationError):
            CreditGrantEvent.model_validate({**GRANT, "cost_basis": bad})
    with pytest.raises(ValidationError):
        CreditGrantEvent.model_validate({**GRANT, "expires_at": datetime(2027, 1, 1)})


# --- Not JSON, not an object, no type -----------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"not json",
        b'{"type": "usage",}',
        b"{'type': 'usage'}",
        b'{"type": "usage"} trailing',
        b'{"type":"usage","customer_ref":"\xff\xfe","reference":"r","tokens":1}',  # not UTF-8
        b"\xef\xbb\xbf" + SPEC_USAGE,  # a byte-order mark
        b'{"type":"usage","customer_ref":"\\ud800","reference":"r","tokens":1}',  # lone surrogate
    ],
)
def test_invalid_json(raw: bytes) -> None:
    exc = rejected(raw)
    assert exc.reason == "invalid_json"
    assert exc.detail.startswith("Invalid JSON")


@pytest.mark.parametrize("raw", [b"[]", b"[{}]", b"5", b'"usage"', b"null", b"true"])
def test_top_level_must_be_an_object(raw: bytes) -> None:
    exc = assert_invalid(raw)
    assert exc.detail == "Input should be an object"


@pytest.mark.parametrize("raw", [b"{}", event(USAGE, type=...)])
def test_missing_type(raw: bytes) -> None:
    exc = assert_invalid(raw)
    assert exc.detail == "type: Field required, one of charge, usage, credit_grant, credit_void"


@pytest.mark.parametrize("value", ["refund", "Charge", "", 5, None])
def test_unknown_type(value: Any) -> None:
    exc = assert_invalid(event(USAGE, type=value), "type: ")
    assert "charge, usage, credit_grant, credit_void" in exc.detail


# --- The detail line ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        event(USAGE, type="t" * 100_000),
        event(USAGE, reference="r" * 100_000),
        event(USAGE, **{"k" * 100_000: 1}),
        event(USAGE, metadata={"k": "v" * 100_000}),
        event(CHARGE, currency="E" * 100_000),
        event(GRANT, cost_basis="9" * 100_000),
        orjson.dumps({f"extra_{i}": i for i in range(1000)}),
    ],
)
def test_detail_stays_short(raw: bytes) -> None:
    exc = rejected(raw)
    assert exc.reason == "invalid_event"
    assert len(exc.detail) <= 500
    assert "\n" not in exc.detail
    assert "x" * 200 not in exc.detail


def test_detail_counts_what_it_leaves_out() -> None:
    raw = orjson.dumps({"type": "charge", **{f"extra_{i}": i for i in range(7)}})
    exc = assert_invalid(raw)
    assert exc.detail.count("Extra inputs are not permitted") == 5
    assert exc.detail.endswith("and 7 more errors")  # 2 extras + 5 missing fields


def test_rejection_is_an_exception_with_a_readable_str() -> None:
    exc = rejected(b"[]")
    assert str(exc) == "invalid_event: Input should be an object"
    assert exc.retriable is False


# --- Fingerprints ---------------------------------------------------------------------------

CHARGE_VARIANTS = [
    SPEC_CHARGE,
    orjson.dumps(CHARGE),
    orjson.dumps(dict(reversed(list(CHARGE.items())))),
    event(CHARGE, currency="eur"),
    event(CHARGE, metadata={"source": "api-endpoint:/v1/images/transform", "job_id": "987"}),
    event(CHARGE, occurred_at="2026-11-22T11:00:00+01:00"),
    event(CHARGE, occurred_at="2026-11-22T10:00:00.000Z"),
    b" \n" + orjson.dumps(CHARGE, option=orjson.OPT_INDENT_2) + b"\n",
]


@pytest.mark.parametrize("variant", CHARGE_VARIANTS)
def test_same_payload_same_fingerprint(variant: bytes) -> None:
    first, again = parse_event(SPEC_CHARGE), parse_event(variant)
    assert canonical_json(again) == canonical_json(first)
    assert fingerprint(again) == fingerprint(first)


@pytest.mark.parametrize(
    "changed",
    [
        event(CHARGE, amount=101),
        event(CHARGE, currency="USD"),
        event(CHARGE, customer_ref="user_124"),
        event(CHARGE, metadata={"job_id": "988", "source": "api-endpoint:/v1/images/transform"}),
        event(CHARGE, metadata=...),
        event(CHARGE, occurred_at="2026-11-22T10:00:00.001Z"),
        event(CHARGE, occurred_at=...),
    ],
)
def test_changed_payload_changes_fingerprint(changed: bytes) -> None:
    assert fingerprint(parse_event(changed)) != fingerprint(parse_event(SPEC_CHARGE))


@pytest.mark.parametrize(
    "variant",
    [
        event(GRANT, priority=...),  # the default, left out
        event(GRANT, effective_at=None, metadata=None, occurred_at=None),  # explicit nulls
        event(GRANT, cost_basis="0.000100"),
    ],
)
def test_defaults_sent_or_not_fingerprint_alike(variant: bytes) -> None:
    assert fingerprint(parse_event(variant)) == fingerprint(parse_event(SPEC_GRANT))


def test_canonical_json_of_the_spec_charge() -> None:
    charge = parse_event(SPEC_CHARGE)
    assert canonical_json(charge) == (
        b'{"amount":100,"currency":"EUR","customer_ref":"user_123","flow_id":"flow_123",'
        b'"metadata":{"job_id":"987","source":"api-endpoint:/v1/images/transform"},'
        b'"occurred_at":"2026-11-22T10:00:00Z","reference":"image-job-987","type":"charge"}'
    )
    assert len(fingerprint(charge)) == 32
    # The canonical form is itself a valid event, with the same canonical form.
    assert canonical_json(parse_event(canonical_json(charge))) == canonical_json(charge)


def _generated_events(count: int, seed: int) -> Iterator[bytes]:
    """Valid-looking events of every type, with every optional field sometimes sent, sent as
    its default or null, timestamps with offsets and microseconds, and nested metadata."""
    rng = random.Random(seed)

    def timestamp(after: datetime) -> str:
        at = after + timedelta(seconds=rng.randint(0, 10**7), microseconds=rng.randint(0, 999_999))
        offset = timezone(timedelta(minutes=rng.choice([0, 0, 60, -330, 840])))
        text = at.astimezone(offset).isoformat()
        return text.replace("+00:00", rng.choice(["Z", "+00:00", "z", "-00:00"]))

    past = NOW - timedelta(days=200)
    metadata = [None, {}, {"b": 1, "a": [1.5, {"z": None, "y": True}], "\u00e9": "\u2028"},
                {"big": -(2**63), "f": 1e300, "g": 1.0, "h": 0.1, "s": "tab\there"}]  # fmt: skip
    for n in range(count):
        kind = rng.choice(["charge", "usage", "credit_grant", "credit_void"])
        body: dict[str, Any] = {"type": kind, "customer_ref": f"c {n}", "reference": f"r\u00e9{n}"}
        if kind == "charge":
            body |= {"flow_id": "f", "amount": rng.randint(1, 10**12),
                     "currency": rng.choice(["eur", "JPY", "KWD"])}  # fmt: skip
        elif kind == "usage":
            body["tokens"] = rng.randint(1, 10**12)
            if rng.random() < 0.5:
                body["feature"] = rng.choice(["chat", None])
        elif kind == "credit_grant":
            body |= {"tokens": rng.randint(1, 10**6), "currency": "usd", "source": "plan",
                     "cost_basis": rng.choice(["0", "0.0001", "0.000100", "12", "1.50",
                                               "0.0000001", "123456789012345678.12345678"])}  # fmt: skip
            if rng.random() < 0.5:
                body["priority"] = rng.choice([0, 3])
            if rng.random() < 0.3:
                body["effective_at"] = timestamp(past)
            if rng.random() < 0.5:
                body["expires_at"] = timestamp(NOW + timedelta(days=400))
            if rng.random() < 0.3:
                body["description"] = rng.choice(["", "x \u00e9\u4e2d", None])
        else:
            body |= {"grant_reference": "g", "reason": "refund \u2603"}
        if rng.random() < 0.5:
            body["occurred_at"] = rng.choice([None, timestamp(past)])
        if rng.random() < 0.5:
            body["metadata"] = rng.choice(metadata)
        yield orjson.dumps(body)


def test_canonical_json_is_the_model_dump_definition() -> None:
    """Stored fingerprints were made from pydantic's model_dump; the faster canonical_json
    must give the same bytes for every event, or re-sent events would become conflicts."""
    checked = 0
    for raw in [SPEC_CHARGE, SPEC_USAGE, SPEC_GRANT, SPEC_VOID, *_generated_events(3000, 7)]:
        parsed = parse_event(raw)
        definition = orjson.dumps(
            parsed.model_dump(mode="json", exclude_defaults=True), option=orjson.OPT_SORT_KEYS
        )
        assert canonical_json(parsed) == definition, raw
        checked += 1
    assert checked == 3004


@pytest.mark.parametrize("raw", [SPEC_CHARGE, SPEC_USAGE, SPEC_GRANT, SPEC_VOID])
def test_canonical_json_round_trips(raw: bytes) -> None:
    first = parse_event(raw)
    assert parse_event(canonical_json(first)) == first


# --- Dedup keys -----------------------------------------------------------------------------


def test_dedup_keys() -> None:
    charge = parse_event(event(CHARGE, flow_id="f", reference="r", customer_ref="c"))
    assert charge.dedup_key == ("f", "r")
    for base in (USAGE, GRANT, VOID):
        assert parse_event(event(base, customer_ref="c", reference="r")).dedup_key == ("c", "r")
    # Usage and grant references live in separate key spaces: the kind says which.
    kinds = {parse_event(event(base)).kind for base in BASES.values()}
    assert kinds == {"charge", "usage", "credit_grant", "credit_void"}


def test_dedup_fields_name_the_fields_of_the_dedup_key() -> None:
    """workers/ingest/known.py reads a record's dedup key by these names, before validation."""
    for base in BASES.values():
        parsed = parse_event(event(base, customer_ref="c", reference="r"))
        assert tuple(getattr(parsed, name) for name in parsed.dedup_fields) == parsed.dedup_key
