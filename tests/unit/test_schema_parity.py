"""The published JSON Schema and the worker judge input events alike.

Each case of a corpus (valid and invalid events: every field's bounds and types, unknown and
missing fields, look-alike letters, invisible characters, trailing newlines, offsets, dates
and leap seconds out of range...) goes through a third-party validator (``jsonschema``,
Draft 2020-12, with its RFC 3339 format check) and through ``schemas.events.parse_event``:
both must give the verdict the case expects. Hypothesis then searches: events generated from
each published schema (with hypothesis-jsonschema) must parse, and events mutated out of
them, or arbitrary JSON, must get the schema's verdict from the worker (the strategies are
in ``tests/strategies.py``).

JSON Schema cannot state a few rules the worker enforces. Those, and only those, may make
the worker refuse what the schema accepts, never the other way round; each is recognised by
the worker's error (``gap_of``):

- ``future``: ``occurred_at`` at most 5 minutes ahead of the worker's clock;
- ``out_of_range``: an instant outside years 1-9999 once converted to UTC
  (0001-01-01T00:00:00+01:00);
- ``expiry_order``: ``expires_at`` after ``effective_at`` (a comparison of two fields);
- ``metadata``: the serialized size (8 KiB) and storable content of ``metadata`` (integers
  within 64 bits, no NaN or Infinity, no U+0000, no unpaired surrogate);
- ``integer_literal``: integers written as JSON integers; JSON Schema's data model makes
  ``100.0`` the integer 100.

Unknown flows are not a parse concern (the apply step dead-letters them). Calendar dates
(2026-02-30) are stated by ``format: date-time``, which the validator checks; none needs
excluding.

The printable character set is checked exhaustively: every code point through the worker's
pattern, the published pattern in Python, and in ECMA 262 when ``node`` is installed.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import string
import subprocess
import sys
import unicodedata
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from pydantic import TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

import schemas.common
from schemas import printable
from schemas.common import Identifier
from schemas.currency import ACTIVE_CURRENCIES, ANY_CASE_CURRENCIES
from schemas.events import INPUT_EVENT, EventRejected, parse_event
from schemas.export import SCHEMA_DIR, export_schemas
from schemas.patterns import JSON_SCHEMA_END
from tests.strategies import (
    GENERATED,
    IDENTIFIERS,
    INPUT_FILES,
    ODD_FOR_FIELD,
    SCHEMAS,
    TYPES,
    dumps,
    json_values,
    odd_values,
)

NOW = datetime(2026, 11, 22, 10, 5, tzinfo=UTC)
# A clock no generated instant is ahead of: the 5-minute rule is out of JSON Schema's reach,
# and would otherwise refuse most instants drawn from the whole calendar.
END_OF_TIME = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
DEEP = os.environ.get("CHARGELINE_DEEP_TESTS") == "1"


def examples(count: int) -> int:
    """``count``, or twenty times as many for a long run (CHARGELINE_DEEP_TESTS=1)."""
    return count * 20 if DEEP else count


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(schemas.common, "utc_now", lambda: NOW)
    yield


# --- The two judges ----------------------------------------------------------------------------

VALIDATORS = {
    name: Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    for name, schema in SCHEMAS.items()
}


def schema_accepts(instance: Any) -> bool:
    """input_event.schema.json's verdict; the file of the event's type must agree."""
    verdict: bool = VALIDATORS["input_event.schema.json"].is_valid(instance)
    kind = instance.get("type") if isinstance(instance, dict) else None
    if isinstance(kind, str) and kind in TYPES:
        assert VALIDATORS[f"{kind}.schema.json"].is_valid(instance) == verdict, instance
    return verdict


@dataclass(frozen=True)
class Judgement:
    accepted: bool
    reason: str | None = None
    detail: str = ""
    errors: tuple[ErrorDetails, ...] = ()


def worker_judges(raw: bytes) -> Judgement:
    """``parse_event``'s verdict, with pydantic's errors to tell which rule refused."""
    try:
        parse_event(raw)
    except EventRejected as exc:
        try:
            INPUT_EVENT.validate_json(raw)
        except ValidationError as error:
            return Judgement(False, exc.reason, exc.detail, tuple(error.errors()))
        raise AssertionError(f"parse_event refused what the adapter accepts: {exc}") from None
    return Judgement(True)


# --- What JSON Schema cannot state -----------------------------------------------------------

GAPS = {
    "future": "occurred_at at most 5 minutes ahead of the worker's clock",
    "out_of_range": "an instant within years 1-9999 once converted to UTC",
    "expiry_order": "expires_at after effective_at",
    "metadata": "metadata's serialized size and storable content",
    "integer_literal": "an integer written without a fraction or exponent",
}
_GAP_BY_ERROR = {
    "datetime_too_far_in_future": "future",
    "datetime_out_of_range": "out_of_range",
    "expiry_before_effective": "expiry_order",
}
_METADATA_ERRORS = {
    "metadata_too_large",
    "metadata_not_serializable",
    "metadata_not_finite",
    "string_nul",
}


def gap_of(errors: tuple[ErrorDetails, ...], instance: Any) -> set[str] | None:
    """The rules out of JSON Schema's reach that ``errors`` come from; None when any error
    comes from a rule the schema states."""
    found: set[str] = set()
    for error in errors:
        gap = _gap(error, instance)
        if gap is None:
            return None
        found.add(gap)
    return found or None


def _gap(error: ErrorDetails, instance: Any) -> str | None:
    kind, loc = error["type"], error["loc"]
    field = loc[1] if len(loc) > 1 else None
    value = instance.get(field) if isinstance(instance, dict) and isinstance(field, str) else None
    if kind in _GAP_BY_ERROR:
        return _GAP_BY_ERROR[kind]
    if field == "metadata" and kind in _METADATA_ERRORS:
        return "metadata"
    if kind == "int_type" and isinstance(value, float) and value.is_integer():
        return "integer_literal"
    if kind == "json_invalid" and isinstance(instance, dict):
        # JSON with an unpaired surrogate is not text the worker reads; the schema refuses
        # one anywhere but in metadata, whose content it leaves open.
        rest = {key: value for key, value in instance.items() if key != "metadata"}
        if _has_surrogate(instance.get("metadata")) and not _has_surrogate(rest):
            return "metadata"
    return None


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return any(0xD800 <= ord(char) <= 0xDFFF for char in value)
    if isinstance(value, dict):
        return any(_has_surrogate(key) or _has_surrogate(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(item) for item in value)
    return False


def assert_same_verdict(instance: Any, raw: bytes | None = None) -> bool:
    """The schema and the worker agree on ``instance`` (sent as ``raw``), but where the
    worker applies a rule the schema cannot state. Returns the schema's verdict."""
    raw = dumps(instance) if raw is None else raw
    accepted = schema_accepts(instance)
    judgement = worker_judges(raw)
    if accepted and not judgement.accepted:
        assert gap_of(judgement.errors, instance), (
            f"the worker refuses what the schema accepts ({judgement.reason}: "
            f"{judgement.detail}): {raw!r}"
        )
    elif judgement.accepted and not accepted:
        errors = [e.message for e in VALIDATORS["input_event.schema.json"].iter_errors(instance)]
        raise AssertionError(f"the worker accepts what the schema refuses ({errors}): {raw!r}")
    return accepted


# --- The corpus ------------------------------------------------------------------------------

CHARGE: dict[str, Any] = {
    "type": "charge",
    "flow_id": "flow_123",
    "customer_ref": "user_123",
    "reference": "image-job-987",
    "amount": 100,
    "currency": "EUR",
    "metadata": {"job_id": "987", "source": "api-endpoint:/v1/images/transform"},
    "occurred_at": "2026-11-22T10:00:00Z",
}
USAGE: dict[str, Any] = {
    "type": "usage",
    "customer_ref": "user_123",
    "reference": "req-abc",
    "tokens": 1532,
    "feature": "chat-completions",
    "occurred_at": "2026-11-22T10:00:01Z",
}
GRANT: dict[str, Any] = {
    "type": "credit_grant",
    "customer_ref": "user_123",
    "reference": "purchase-789",
    "tokens": 100000,
    "cost_basis": "0.0001",
    "currency": "USD",
    "expires_at": "2027-11-22T00:00:00Z",
    "priority": 0,
    "source": "purchase",
    "description": "100K tokens",
}
VOID: dict[str, Any] = {
    "type": "credit_void",
    "customer_ref": "user_123",
    "reference": "refund-1",
    "grant_reference": "purchase-789",
    "reason": "refunded",
}
BASES = {"charge": CHARGE, "usage": USAGE, "credit_grant": GRANT, "credit_void": VOID}


@dataclass(frozen=True)
class Case:
    id: str
    instance: Any
    valid: bool
    gap: str | None = None  # the rule JSON Schema cannot state that refuses it
    raw: bytes | None = None  # the record value, when not dumps(instance)


def changed(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """``base`` with fields changed; a value of ``...`` removes the field."""
    return {k: v for k, v in {**base, **changes}.items() if v is not ...}


def raw_case(id: str, raw: bytes, valid: bool, gap: str | None = None) -> Case:
    return Case(id, json.loads(raw), valid, gap, raw)


GOOD_IDENTIFIERS = {
    "one char": "a",
    "200 chars": "a" * 200,
    "inner space": "with space",
    "spaces only": "   ",
    "email": "user_123@example.com",
    "cjk": "日本語",
    "emoji": "émoji-😀",
    "astral letter": "\U0001d518",
    "combining mark": "e\u0301",
}
BAD_IDENTIFIERS: dict[str, Any] = {
    "empty": "",
    "201 chars": "a" * 201,
    "trailing newline": "abc\n",
    "newline": "line\nbreak",
    "tab": "tab\there",
    "carriage return": "cr\r",
    "NUL": "nul\x00",
    "bell": "bell\x07",
    "DEL": "del\x7f",
    "NEL": "nel\x85",
    "zero-width space U+200B": "a\u200bb",
    "zero-width joiner U+200D": "a\u200db",
    "no-break space U+00A0": "no\u00a0break",
    "soft hyphen U+00AD": "soft\u00adhyphen",
    "line separator U+2028": "line\u2028sep",
    "paragraph separator U+2029": "para\u2029sep",
    "ideographic space U+3000": "a\u3000b",
    "byte order mark U+FEFF": "\ufeffbom",
    "right-to-left override U+202E": "a\u202eb",
    "language tag U+E0001": "a\U000e0001",
    "private use U+E000": "private\ue000",
    "private use plane 15": "\U000f0000",
    "noncharacter U+FFFF": "a\uffff",
    "unassigned U+0378": "a\u0378",
    "assigned only in Unicode 15 U+1F6DC": "a\U0001f6dc",
    "unpaired surrogate": "a\ud800",
    "number": 123,
    "null": None,
    "list": ["a"],
    "bool": True,
}
GOOD_CURRENCIES = ("EUR", "eur", "Eur", "eUr", "jpy", "KWD", "kwd", "CHE", "usd")
BAD_CURRENCIES: dict[str, Any] = {
    "dotless i (INR)": "\u0131nr",
    "long s (SEK)": "\u017fek",
    "Kelvin sign (KWD)": "\u212awd",
    "fullwidth (EUR)": "\uff25\uff35\uff32",
    "XXX": "XXX",
    "XTS": "XTS",
    "XAU": "XAU",
    "XDR": "XDR",
    "ZWL (withdrawn)": "ZWL",
    "HRK (withdrawn)": "HRK",
    "ZZZ": "ZZZ",
    "trailing newline": "EUR\n",
    "leading space": " EUR",
    "trailing space": "EUR ",
    "zero-width space": "EU\u200bR",
    "two letters": "EU",
    "four letters": "EURO",
    "empty": "",
    "symbol": "€",
    "number": 978,
    "null": None,
}
GOOD_TIMES = {
    "Z": "2026-11-22T10:00:00Z",
    "lower case t and z": "2026-11-22t10:00:00z",
    "+01:00": "2026-11-22T11:00:00+01:00",
    "-05:00": "2026-11-22T05:00:00-05:00",
    "-00:00": "2026-11-22T10:00:00-00:00",
    "+23:59": "2026-11-23T09:59:00+23:59",
    "one fraction digit": "2026-11-22T10:00:00.5Z",
    "nine fraction digits": "2026-11-22T10:00:00.123456789Z",
    "leap day": "2024-02-29T10:00:00Z",
    "year 1": "0001-01-01T00:00:00.000001Z",
    "year 1 minus an hour in UTC": "0001-01-01T01:00:01+01:00",
    "end of day": "2026-11-21T23:59:59Z",
}
BAD_TIMES: dict[str, Any] = {
    "offset minutes 60": "2026-11-22T10:00:00+05:60",
    "offset hours 24": "2026-11-22T10:00:00+24:00",
    "offset -25:00": "2026-11-22T10:00:00-25:00",
    "offset without colon": "2026-11-22T10:00:00+0100",
    "offset hours only": "2026-11-22T10:00:00+01",
    "offset with seconds": "2026-11-22T10:00:00+01:00:00",
    "hour 24": "2026-11-22T24:00:00Z",
    "minute 60": "2026-11-22T10:60:00Z",
    "leap second": "2016-12-31T23:59:60Z",
    "month 13": "2026-13-01T10:00:00Z",
    "month 00": "2026-00-10T10:00:00Z",
    "day 00": "2026-11-00T10:00:00Z",
    "day 32": "2026-10-32T10:00:00Z",
    "February 30": "2026-02-30T10:00:00Z",
    "February 29 of a common year": "2026-02-29T10:00:00Z",
    "April 31": "2026-04-31T10:00:00Z",
    "year 0000": "0000-01-01T00:00:00Z",
    "naive": "2026-11-22T10:00:00",
    "space separator": "2026-11-22 10:00:00Z",
    "no seconds": "2026-11-22T10:00Z",
    "ten fraction digits": "2026-11-22T10:00:00.1234567891Z",
    "empty fraction": "2026-11-22T10:00:00.Z",
    "comma fraction": "2026-11-22T10:00:00,5Z",
    "trailing newline": "2026-11-22T10:00:00Z\n",
    "fullwidth digits": "\uff12\uff10\uff12\uff16-11-22T10:00:00Z",
    "date only": "2026-11-22",
    "number in a string": "1700000000",
    "number": 1700000000,
    "empty": "",
    "words": "yesterday",
}


def _identifier_cases() -> Iterator[Case]:
    for base in BASES.values():
        for field in IDENTIFIERS:
            if field not in base:
                continue
            where = f"{base['type']}.{field}"
            for name, good in GOOD_IDENTIFIERS.items():
                yield Case(f"{where} {name}", changed(base, **{field: good}), True)
            for name, bad in BAD_IDENTIFIERS.items():
                optional = field == "feature" and bad is None
                yield Case(f"{where} {name}", changed(base, **{field: bad}), optional)


def _currency_cases() -> Iterator[Case]:
    for base in (CHARGE, GRANT):
        where = f"{base['type']}.currency"
        for code in GOOD_CURRENCIES:
            yield Case(f"{where} {code}", changed(base, currency=code), True)
        for name, bad in BAD_CURRENCIES.items():
            yield Case(f"{where} {name}", changed(base, currency=bad), False)


def _timestamp_cases() -> Iterator[Case]:
    for base in BASES.values():
        for name, good in GOOD_TIMES.items():
            yield Case(f"{base['type']}.occurred_at {name}", changed(base, occurred_at=good), True)
        for name, bad in BAD_TIMES.items():
            yield Case(f"{base['type']}.occurred_at {name}", changed(base, occurred_at=bad), False)
    for field in ("expires_at", "effective_at"):
        # The far future is fine but for occurred_at; effective_at alone (no expiry to precede).
        alone = GRANT if field == "expires_at" else changed(GRANT, expires_at=...)
        for name, good in {**GOOD_TIMES, "year 9999": "9999-12-31T23:59:59.999998Z"}.items():
            yield Case(f"credit_grant.{field} {name}", changed(alone, **{field: good}), True)
        for name, bad in BAD_TIMES.items():
            yield Case(f"credit_grant.{field} {name}", changed(alone, **{field: bad}), False)


def _number_cases() -> Iterator[Case]:
    for base, field in ((CHARGE, "amount"), (USAGE, "tokens"), (GRANT, "tokens")):
        where = f"{base['type']}.{field}"
        for good in (1, 10**12):
            yield Case(f"{where} {good}", changed(base, **{field: good}), True)
        for bad in (0, -1, 10**12 + 1, 2**63, 10**30, True, "100", None, [100], 100.5, 1e400):
            yield Case(f"{where} {bad!r}", changed(base, **{field: bad}), False)
        yield Case(f"{where} 100.0", changed(base, **{field: 100.0}), False, "integer_literal")
        written = dumps(changed(base, **{field: 0}))
        exponent = written.replace(f'"{field}": 0'.encode(), f'"{field}": 1e2'.encode())
        yield raw_case(f"{where} 1e2", exponent, False, "integer_literal")
    for good in (0, 1000):
        yield Case(f"credit_grant.priority {good}", changed(GRANT, priority=good), True)
    for bad in (-1, 1001, None, "0", False):
        yield Case(f"credit_grant.priority {bad!r}", changed(GRANT, priority=bad), False)
    yield Case("credit_grant.priority 0.0", changed(GRANT, priority=0.0), False, "integer_literal")


def _text_cases() -> Iterator[Case]:
    for basis in ("0", "0.0001", "12.50", "0.000", "999999999999999999.999999999999999999"):
        yield Case(f"cost_basis {basis!r}", changed(GRANT, cost_basis=basis), True)
    bad_bases = ("-1", "+1", "1e-4", "01", ".5", "5.", "", " 1", "1 ", "1\n", "NaN",
                 "\u0661\u0662", "1000000000000000000", "0.0000000000000000001", 0.0001, 0, None)  # fmt: skip
    for bad in bad_bases:
        yield Case(f"cost_basis {bad!r}", changed(GRANT, cost_basis=bad), False)
    for source in ("purchase", "plan", "promotional", "auto_reload", "manual"):
        yield Case(f"source {source}", changed(GRANT, source=source), True)
    for bad in ("gift", "PURCHASE", "purchase\n", "", None):
        yield Case(f"source {bad!r}", changed(GRANT, source=bad), False)
    for text in ("", "d" * 500, "two\nlines\n", "tab\tand \u2028 and \u200b", "nul-free \u00a0"):
        yield Case(f"description {text[:12]!r}", changed(GRANT, description=text), True)
    for bad in ("d" * 501, "nul\x00", "a\ud800", 5):
        yield Case(f"description {bad!r:.14}", changed(GRANT, description=bad), False)
    for text in ("r", "r" * 500, "refund\n"):
        yield Case(f"reason {text[:12]!r}", changed(VOID, reason=text), True)
    for bad in ("", "r" * 501, "nul\x00", "\udfff", None):
        yield Case(f"reason {bad!r:.14}", changed(VOID, reason=bad), False)


def _shape_cases() -> Iterator[Case]:
    for kind, base in BASES.items():
        other = "usage" if kind != "usage" else "charge"
        yield Case(f"{kind} unknown field", changed(base, ammount=100), False)
        yield Case(f"{kind} unknown null field", changed(base, extra=None), False)
        yield Case(f"{kind} type of another", changed(base, type=other), False)
        yield Case(f"{kind} no type", changed(base, type=...), False)
        yield Case(f"{kind} metadata list", changed(base, metadata=[1]), False)
        yield Case(f"{kind} metadata string", changed(base, metadata="x"), False)
        yield Case(f"{kind} metadata nested", changed(base, metadata={"a": [1, {"b": None}]}), True)
        yield Case(f"{kind} metadata empty", changed(base, metadata={}), True)
        for field in base:
            if field in REQUIRED[kind]:
                yield Case(f"{kind} without {field}", changed(base, **{field: ...}), False)
    for bad in ("refund", "Charge", "charge\n", "", 5, None):
        yield Case(f"type {bad!r}", changed(USAGE, type=bad), False)
    top_levels: tuple[Any, ...] = ([], [USAGE], 5, "usage", None, True, {})
    for value in top_levels:
        yield Case(f"top level {value!r:.12}", value, False)
    usage = dumps(USAGE)
    tokens_zero = dumps(changed(USAGE, tokens=0))
    yield raw_case("duplicate key, last valid",
                   tokens_zero.replace(b'"tokens": 0', b'"tokens": 0, "tokens": 5'), True)  # fmt: skip
    yield raw_case("duplicate key, last invalid",
                   tokens_zero.replace(b'"tokens": 0', b'"tokens": 5, "tokens": 0'), False)  # fmt: skip
    yield raw_case("surrogate escape in reference",
                   usage.replace(b'"req-abc"', b'"req-\\ud83d"'), False)  # fmt: skip
    yield raw_case("escaped pair in reference",
                   usage.replace(b'"req-abc"', b'"req-\\ud83d\\ude00"'), True)  # fmt: skip


def _gap_cases() -> Iterator[Case]:
    """What JSON Schema cannot state: the schema accepts, the worker refuses."""
    ahead = (NOW + timedelta(minutes=5, seconds=1)).isoformat()
    for kind, base in BASES.items():
        yield Case(f"{kind} occurred_at 5 min 1 s ahead", changed(base, occurred_at=ahead),
                   False, "future")  # fmt: skip
        yield Case(f"{kind} occurred_at year 0 in UTC",
                   changed(base, occurred_at="0001-01-01T00:00:00+01:00"), False, "out_of_range")  # fmt: skip
        # The first instant a datetime holds, which the Postgres driver writes as -infinity.
        yield Case(f"{kind} occurred_at the first instant",
                   changed(base, occurred_at="0001-01-01T01:00:00+01:00"), False, "out_of_range")  # fmt: skip
        yield Case(f"{kind} metadata of 8193 bytes", changed(base, metadata={"k": "x" * 8185}),
                   False, "metadata")  # fmt: skip
        yield Case(f"{kind} metadata integer beyond 64 bits", changed(base, metadata={"n": 2**64}),
                   False, "metadata")  # fmt: skip
        yield Case(f"{kind} metadata NUL", changed(base, metadata={"s": "\x00"}), False, "metadata")
        yield Case(f"{kind} metadata unpaired surrogate", changed(base, metadata={"s": "\udc00"}),
                   False, "metadata")  # fmt: skip
        nan = dumps(changed(base, metadata={"v": 0})).replace(b'"v": 0', b'"v": NaN')
        yield raw_case(f"{kind} metadata NaN", nan, False, "metadata")
    effective = "2026-12-01T00:00:00Z"
    yield Case("expires_at year 10000 in UTC",
               changed(GRANT, expires_at="9999-12-31T23:59:59-01:00"), False, "out_of_range")  # fmt: skip
    yield Case("expires_at the last instant (infinity to the Postgres driver)",
               changed(GRANT, expires_at="9999-12-31T23:59:59.9999999Z"), False, "out_of_range")  # fmt: skip
    yield Case("expires_at at effective_at", changed(GRANT, effective_at=effective,
               expires_at="2026-12-01T01:00:00+01:00"), False, "expiry_order")  # fmt: skip
    yield Case("expires_at before effective_at", changed(GRANT, effective_at=effective,
               expires_at="2026-11-30T00:00:00Z"), False, "expiry_order")  # fmt: skip
    yield Case("expires_at after effective_at", changed(GRANT, effective_at=effective,
               expires_at="2026-12-01T00:00:01Z"), True)  # fmt: skip


REQUIRED = {
    "charge": {"flow_id", "customer_ref", "reference", "amount", "currency"},
    "usage": {"customer_ref", "reference", "tokens"},
    "credit_grant": {"customer_ref", "reference", "tokens", "cost_basis", "currency", "source"},
    "credit_void": {"customer_ref", "reference", "grant_reference", "reason"},
}
CORPUS = [
    Case("minimal usage", {"type": "usage", "customer_ref": "c", "reference": "r", "tokens": 1},
         True),
    Case("nulls for optional fields", changed(GRANT, effective_at=None, metadata=None,
         occurred_at=None, description=None, expires_at=None), True),
    *(Case(f"spec {kind}", base, True) for kind, base in BASES.items()),
    *_identifier_cases(),
    *_currency_cases(),
    *_timestamp_cases(),
    *_number_cases(),
    *_text_cases(),
    *_shape_cases(),
    *_gap_cases(),
]  # fmt: skip


def test_the_corpus_names_each_case_once() -> None:
    ids = [case.id for case in CORPUS]
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]
    assert len(CORPUS) > 900
    assert {case.gap for case in CORPUS} - {None} == set(GAPS)


@pytest.mark.parametrize("case", CORPUS, ids=[case.id for case in CORPUS])
def test_schema_and_worker_agree(case: Case) -> None:
    raw = dumps(case.instance) if case.raw is None else case.raw
    judgement = worker_judges(raw)
    if case.gap is None:
        assert schema_accepts(case.instance) is case.valid, "the schema's verdict"
        assert judgement.accepted is case.valid, f"{judgement.reason}: {judgement.detail}"
    else:
        assert schema_accepts(case.instance), "JSON Schema cannot state this rule"
        assert not judgement.accepted
        assert gap_of(judgement.errors, case.instance) == {case.gap}, judgement.detail
    if not judgement.accepted:
        assert judgement.reason in {"invalid_event", "invalid_json"}


# --- The published patterns ------------------------------------------------------------------


def _patterns(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "pattern" and isinstance(value, str):
                yield value
            else:
                yield from _patterns(value)
    elif isinstance(node, list):
        for item in node:
            yield from _patterns(item)


def test_every_published_pattern_ends_where_the_text_ends() -> None:
    """Python's ``$`` matches before a final newline: each pattern says ``$(?!\\n)``."""
    found = [p for schema in export_schemas().values() for p in _patterns(schema)]
    assert len(found) >= 5
    for pattern in found:
        assert pattern.startswith("^"), pattern[:40]
        assert pattern.endswith(JSON_SCHEMA_END), pattern[:40]
        re.compile(pattern)


def test_long_patterns_are_written_once_per_file() -> None:
    for name in INPUT_FILES:
        text = (SCHEMA_DIR / name).read_text(encoding="utf-8")
        assert text.count('"pattern": "^[ -~\\u00a1-') == 1, name
        assert text.count('"#/$defs/PrintableText"') >= 2, name
        assert text.isascii(), name
        assert all(char.isprintable() for char in text.replace("\n", "")), name


def test_currency_pattern_is_the_any_case_set() -> None:
    pattern = re.compile(SCHEMAS["charge.schema.json"]["$defs"]["ActiveCurrencyCode"]["pattern"])
    assert len(ANY_CASE_CURRENCIES) == 8 * len(ACTIVE_CURRENCIES)
    for code in ANY_CASE_CURRENCIES:
        assert pattern.match(code), code
    matched = {
        "".join(letters)
        for letters in itertools.product(string.ascii_letters, repeat=3)
        if pattern.match("".join(letters))
    }
    assert matched == ANY_CASE_CURRENCIES  # of every string of three ASCII letters


# --- The printable set, code point by code point ---------------------------------------------


@cache
def not_printable() -> frozenset[int]:
    return frozenset(c for first, last in printable.NOT_PRINTABLE for c in range(first, last + 1))


def test_the_worker_and_the_schema_refuse_exactly_the_table() -> None:
    identifier: TypeAdapter[str] = TypeAdapter(Identifier)
    published = re.compile(SCHEMAS["usage.schema.json"]["$defs"]["PrintableText"]["pattern"])
    refused = not_printable()
    worker_differs, schema_differs = [], []
    for code_point in range(sys.maxunicode + 1):
        char = chr(code_point)
        expected = code_point not in refused
        if (published.match(char) is not None) is not expected:
            schema_differs.append(code_point)
        if 0xD800 <= code_point <= 0xDFFF:
            continue  # no UTF-8 (or Rust) string holds one: JSON with one is invalid_json
        try:
            identifier.validate_python(char)
        except ValidationError:
            accepted = False
        else:
            accepted = True
        if accepted is not expected:
            worker_differs.append(code_point)
    assert not worker_differs, [f"U+{c:04X}" for c in worker_differs[:20]]
    assert not schema_differs, [f"U+{c:04X}" for c in schema_differs[:20]]
    assert not printable.is_printable("abc\n")
    assert printable.is_printable("abc")


@pytest.mark.skipif(
    unicodedata.unidata_version != printable.UNICODE_VERSION,
    reason="the table was generated from Unicode 14.0 (Python 3.11)",
)
def test_the_table_is_python_3_11_isprintable() -> None:
    generated = printable.not_printable_ranges()
    assert generated == printable.NOT_PRINTABLE, "run `python -m schemas.printable`"
    assert printable.format_table(generated) in (SCHEMA_DIR.parent / "printable.py").read_text()
    refused = not_printable()
    for code_point in range(sys.maxunicode + 1):
        assert chr(code_point).isprintable() is (code_point not in refused), hex(code_point)


_ECMA_CHECK = """
const fs = require("fs");
const schema = JSON.parse(fs.readFileSync(process.argv[1], "utf8"));
const printable = new RegExp(schema.$defs.PrintableText.pattern, "u");
const currency = new RegExp(schema.$defs.ActiveCurrencyCode.pattern, "u");
const refused = [];
let start = null;
for (let c = 0; c <= 0x10ffff; c++) {
  const bad = !printable.test(String.fromCodePoint(c));
  if (bad && start === null) start = c;
  if (!bad && start !== null) { refused.push([start, c - 1]); start = null; }
}
if (start !== null) refused.push([start, 0x10ffff]);
const samples = JSON.parse(process.argv[2]);
console.log(JSON.stringify({
  refused,
  printable: samples.map((s) => printable.test(s)),
  currency: samples.map((s) => currency.test(s)),
}));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node (an ECMA 262 engine)")
def test_ecma_262_reads_the_published_patterns_alike() -> None:
    samples = ["abc", "abc\n", "a\u200bb", "EUR", "eur", "EUR\n", "\u0131nr", "XXX", ""]
    node = shutil.which("node")
    assert node is not None
    out = subprocess.run(
        [node, "-e", _ECMA_CHECK, str(SCHEMA_DIR / "charge.schema.json"), json.dumps(samples)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    verdicts = json.loads(out.stdout)
    assert tuple(map(tuple, verdicts["refused"])) == printable.NOT_PRINTABLE
    assert verdicts["printable"] == [True, False, False, True, True, False, True, True, True]
    assert verdicts["currency"] == [False, False, False, True, True, False, False, False, False]


# --- Generated events --------------------------------------------------------------------------


def _far_clock() -> AbstractContextManager[Any]:
    return mock.patch.object(schemas.common, "utc_now", lambda: END_OF_TIME)


@pytest.mark.parametrize("name", INPUT_FILES)
@settings(
    max_examples=examples(150),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(data=st.data())
def test_events_generated_from_the_schema_parse(name: str, data: st.DataObject) -> None:
    instance = data.draw(GENERATED[name], label="event")
    assert VALIDATORS[name].is_valid(instance), "the generator follows the schema"
    raw = dumps(instance, ascii_only=data.draw(st.booleans(), label="ascii only"))
    with _far_clock():
        assert assert_same_verdict(instance, raw)
        judgement = worker_judges(raw)
        if judgement.accepted:
            event = parse_event(raw)
            for field in ("reference", "customer_ref", "flow_id", "feature", "grant_reference"):
                assert getattr(event, field, None) == instance.get(field), field
            if "currency" in instance:
                assert getattr(event, "currency", None) == instance["currency"].upper()


# --- Mutated events and arbitrary JSON ---------------------------------------------------------

FIELD_NAMES = sorted({key for base in BASES.values() for key in base} | {"effective_at", "amount"})


@st.composite
def mutated_events(draw: st.DrawFn) -> Any:
    """A generated event with one field set to an odd value (mostly one on the edge of the
    field's rule), and sometimes more changes: fields set, removed or added."""
    event = dict(draw(GENERATED["input_event.schema.json"], label="event"))
    field = draw(st.sampled_from(sorted(event)))
    odd = ODD_FOR_FIELD.get(field, odd_values)
    event[field] = draw(st.one_of(odd, odd, odd_values))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        action = draw(st.sampled_from(["set", "remove", "add"]))
        if action == "remove" and event:
            del event[draw(st.sampled_from(sorted(event)))]
        elif action == "add":
            event[draw(st.text(max_size=8) | st.sampled_from(FIELD_NAMES))] = draw(json_values)
        else:
            field = draw(st.sampled_from(FIELD_NAMES))
            event[field] = draw(ODD_FOR_FIELD.get(field, odd_values))
    return event


EDGES = [
    (base, field)
    for base in BASES.values()
    for field in (*base, "effective_at")
    if field in ODD_FOR_FIELD and (field != "effective_at" or base is GRANT)
]


@pytest.mark.parametrize(
    ("base", "field"), EDGES, ids=[f"{base['type']}.{field}" for base, field in EDGES]
)
@settings(max_examples=examples(100), deadline=None)
@given(data=st.data())
def test_each_field_on_the_edge_of_its_rule(
    base: dict[str, Any], field: str, data: st.DataObject
) -> None:
    """A valid event with one field drawn from values at, or just past, its rule's edge."""
    value = data.draw(ODD_FOR_FIELD[field], label=field)
    event = changed(base, **{field: value})
    if field == "effective_at":
        event = changed(event, expires_at=...)
    with _far_clock():
        assert_same_verdict(event)


@settings(
    max_examples=examples(600),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(event=mutated_events(), ascii_only=st.booleans())
@example(event=changed(CHARGE, currency="\u0131nr"), ascii_only=False)
@example(event=changed(CHARGE, currency="\u017fek"), ascii_only=False)
@example(event=changed(USAGE, occurred_at="2026-11-22T10:00:00+05:60"), ascii_only=False)
@example(event=changed(USAGE, reference="req\u200b"), ascii_only=True)
def test_mutated_events_get_the_schema_verdict(event: Any, ascii_only: bool) -> None:
    with _far_clock():
        assert_same_verdict(event, dumps(event, ascii_only=ascii_only))


@settings(max_examples=examples(300), deadline=None)
@given(
    value=json_values
    | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=6), odd_values, max_size=8)
)
def test_arbitrary_json_gets_the_schema_verdict(value: Any) -> None:
    with _far_clock():
        assert_same_verdict(value)
