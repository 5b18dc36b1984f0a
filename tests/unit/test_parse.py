"""Parsing records (step 1) and the pure helpers around it: every way a record can fail
becomes a rejection with a reason, never an exception; the classification of failures into
retried (outages, a database set up wrong) and the records' fault; dead-letter headers."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest

from workers import db
from workers.ingest.deadletters import dlq_record
from workers.ingest.parse import Parsed, Rejected, describe_exception, parse_records, record_time
from workers.ingest.pipeline import LaneBroken
from workers.ingest.processor import is_record_fault
from workers.kafka import decode_headers, encode_headers
from workers.retry import Stopping

NOW_MS = 1_795_000_000_000  # 2026-11-18


@dataclass
class Rec:
    topic: str = "billing.usage"
    partition: int = 0
    offset: int = 0
    key: bytes | None = b"c1"
    value: bytes | None = None
    timestamp: int = NOW_MS
    headers: tuple[tuple[str, bytes | None], ...] = ()


class Exploding:
    """A record whose value cannot be read: what a bug looks like from the parser's side."""

    def __init__(self, offset: int = 0) -> None:
        self.topic, self.partition, self.offset = "billing.usage", 0, offset
        self.key, self.timestamp, self.headers = b"c1", NOW_MS, ()

    @property
    def value(self) -> bytes:
        raise RuntimeError("cannot read\x00 this")


def usage_bytes(**fields: Any) -> bytes:
    event = {"type": "usage", "customer_ref": "c1", "reference": "u1", "tokens": 5, **fields}
    return orjson.dumps(event)


def parse(*records: Rec | Exploding) -> tuple[list[Parsed], list[Rejected]]:
    return parse_records(
        records, accepted_types=frozenset({"usage", "credit_grant"}), max_event_bytes=2048
    )


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (Rec(value=None), "invalid_json"),
        (Rec(value=b""), "invalid_json"),
        (Rec(value=b"{"), "invalid_json"),
        (Rec(value=b"x" * 4096), "payload_too_large"),
        (Rec(value=usage_bytes(tokens=0)), "invalid_event"),
        (Rec(value=usage_bytes(occurred_at="0001-01-01T00:00:00+01:00")), "invalid_event"),
        (Rec(value=usage_bytes(), key=b"c2"), "key_mismatch"),
        (Rec(value=usage_bytes(), key=None), "key_mismatch"),
        (Rec(value=orjson.dumps({"type": "credit_void", "customer_ref": "c1",
                                 "reference": "v", "grant_reference": "g",
                                 "reason": "r"})), "wrong_topic"),
        # No occurred_at, and a record timestamp that is no time to default it to.
        (Rec(value=usage_bytes(), timestamp=-1), "invalid_event"),
        (Rec(value=usage_bytes(), timestamp=2**62), "invalid_event"),
        (Exploding(), "unprocessable"),
    ],
)  # fmt: skip
def test_each_way_a_record_fails_is_a_rejection(record: Rec | Exploding, reason: str) -> None:
    parsed, rejected = parse(record)
    assert parsed == []
    [rejection] = rejected
    assert rejection.reason == reason
    assert rejection.detail
    assert "\x00" not in rejection.detail


def test_a_record_timestamp_out_of_range_does_not_matter_when_occurred_at_is_given() -> None:
    parsed, rejected = parse(
        Rec(value=usage_bytes(occurred_at="2026-11-18T10:00:00Z"), timestamp=-1),
        Rec(value=usage_bytes(reference="u2"), offset=1),
    )
    assert rejected == []
    assert [p.event.reference for p in parsed] == ["u1", "u2"]
    assert parsed[1].occurred_at == record_time(Rec())


def test_the_records_around_a_failing_one_are_parsed_in_order() -> None:
    parsed, rejected = parse(
        Rec(value=usage_bytes(reference="a"), offset=0),
        Exploding(offset=1),
        Rec(value=usage_bytes(reference="b"), offset=2),
    )
    assert [p.event.reference for p in parsed] == ["a", "b"]
    assert [(r.record.offset, r.reason) for r in rejected] == [(1, "unprocessable")]
    assert rejected[0].detail == "RuntimeError: cannot read\\0 this"


def test_record_time_bounds() -> None:
    assert record_time(Rec(timestamp=0)) is not None
    assert record_time(Rec(timestamp=253_402_300_799_999)) is not None
    assert record_time(Rec(timestamp=253_402_300_800_000)) is None
    assert record_time(Rec(timestamp=-1)) is None


def test_describe_exception_is_one_storable_line() -> None:
    detail = describe_exception(ValueError("a\nb\x00c" + "x" * 1000))
    assert detail.startswith("ValueError: a b\\0c")
    assert len(detail) == 500
    assert "\n" not in detail


@pytest.mark.parametrize(
    ("exc", "retried", "records_to_blame"),
    [
        (OSError("connection refused"), True, False),
        (TimeoutError(), True, False),
        (asyncpg.ConnectionDoesNotExistError("gone"), True, False),
        (asyncpg.DeadlockDetectedError("deadlock"), True, False),
        (asyncpg.CannotConnectNowError("starting up"), True, False),
        (asyncpg.InsufficientPrivilegeError("permission denied"), True, False),
        (asyncpg.UndefinedTableError("no such table"), True, False),
        (asyncpg.CheckViolationError("check"), False, True),
        (asyncpg.UniqueViolationError("unique"), False, True),
        (asyncpg.NumericValueOutOfRangeError("out of range"), False, True),
        (asyncpg.DataError("client-side encoding"), False, True),
        (asyncpg.ProgramLimitExceededError("index row too large"), False, True),
        (OverflowError("date value out of range"), False, True),
        (ZeroDivisionError(), False, True),
        (Stopping("shutting down"), False, False),
        (LaneBroken("an earlier part failed"), False, False),
    ],
)
def test_failures_are_retried_or_blamed_on_the_records(
    exc: BaseException, retried: bool, records_to_blame: bool
) -> None:
    assert db.is_retried(exc) is retried
    assert is_record_fault(exc) is records_to_blame


def test_headers_without_a_value_are_stored_and_republished_empty() -> None:
    headers: list[tuple[str, bytes | None]] = [("trace", b"\x00\xff"), ("empty", None)]
    assert decode_headers(encode_headers(headers)) == [("trace", b"\x00\xff"), ("empty", b"")]
    rejected = Rejected(Rec(value=b"{", headers=tuple(headers)), "invalid_json", "broken")
    value, dlq_headers = dlq_record(rejected)
    assert value == b"{"
    assert dlq_headers[:2] == [("trace", b"\x00\xff"), ("empty", b"")]
    assert ("chargeline.reason", b"invalid_json") in dlq_headers


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def test_occurred_at_is_judged_against_the_record_timestamp_whenever_it_is_read() -> None:
    """Five minutes ahead of the record's timestamp is refused even when the worker reads it
    later (a lagging worker, a replay) and its clock has caught up: the same verdict as
    when it was live."""
    sent = int(time.time() * 1000) - 3_600_000  # appended an hour ago
    ahead = Rec(value=usage_bytes(occurred_at=_iso(sent + 330_000)), timestamp=sent)
    within = Rec(value=usage_bytes(reference="u2", occurred_at=_iso(sent + 290_000)),
                 timestamp=sent, offset=1)  # fmt: skip
    parsed, rejected = parse(ahead, within)
    assert [p.record.offset for p in parsed] == [1]
    assert [(r.reason, r.detail) for r in rejected] == [
        ("invalid_event", "occurred_at: Datetime should not be more than 5 minutes in the "
         "future (of the record's timestamp)"),
    ]  # fmt: skip


def test_a_record_timestamp_far_ahead_is_no_default_for_occurred_at() -> None:
    now = int(time.time() * 1000)
    parsed, rejected = parse(
        Rec(value=usage_bytes(), timestamp=now + 3_600_000),
        Rec(value=usage_bytes(reference="u2"), timestamp=now + 60_000, offset=1),
    )
    assert [p.record.offset for p in parsed] == [1]  # a producer's clock a minute ahead
    assert [r.reason for r in rejected] == ["invalid_event"]
    assert "absent, and the record's timestamp" in rejected[0].detail
