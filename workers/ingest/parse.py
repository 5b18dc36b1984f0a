"""Step 1 of a batch: turn raw Kafka records into validated events or rejections.

Nothing here touches a server. A record that cannot become an event is data, not a crash:
it becomes a ``Rejected`` with a reason code and a one-line detail, and goes to the
dead-letter path while its neighbours carry on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from schemas import common
from schemas.common import MAX_FUTURE_SKEW
from schemas.events import EventRejected, InputEvent, canonical_json, parse_event


class Record(Protocol):
    """What the worker reads of a Kafka record (aiokafka's ``ConsumerRecord``, untyped)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes | None]]: ...


@dataclass(slots=True)
class Parsed:
    """A valid event and where it came from."""

    record: Record
    event: InputEvent
    payload: bytes  # canonical JSON of the event as sent, stored with the event
    fingerprint: bytes  # sha256 of payload: equal fingerprints, same payload
    raw_digest: bytes  # of the record value as it arrived, stored too (workers/ingest/known.py)
    occurred_at: datetime
    # The event's, read once here: dedupe and judge look at them several times per event.
    event_type: str
    dedup_key: tuple[str, str]


@dataclass(slots=True, frozen=True)
class Conflict:
    """Both payloads of a reference re-used with another payload."""

    dedup_key: tuple[str, str]
    original_payload: str  # JSON, as first recorded
    conflicting_payload: str  # JSON, as sent now


@dataclass(slots=True)
class Rejected:
    """A record that will be dead-lettered, with its reason code and a readable detail."""

    record: Record
    reason: str
    detail: str
    event_type: str = "unknown"
    conflict: Conflict | None = None


@dataclass(slots=True, frozen=True)
class BareRecord:
    """A record as plain data: what a dead letter keeps (without the headers) when the
    headers themselves cannot be stored, and a record built by hand."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int
    headers: tuple[tuple[str, bytes | None], ...] = ()

    @classmethod
    def of(cls, record: Record) -> BareRecord:
        return cls(
            record.topic, record.partition, record.offset, record.key, record.value,
            record.timestamp,
        )  # fmt: skip


def raw_digest(value: bytes) -> bytes:
    """The digest stored with an event's dedup row, of the record value as it arrived:
    blake2b in 16 bytes, ample to tell one record's bytes from another's."""
    return hashlib.blake2b(value, digest_size=16).digest()


def record_time(record: Record) -> datetime | None:
    """The record's timestamp, or None when it is not a time (a producer may set any 64-bit
    number of milliseconds; -1 means none)."""
    timestamp = record.timestamp
    if timestamp is None or not 0 <= timestamp <= _MAX_RECORD_TIMESTAMP_MS:
        return None
    return datetime.fromtimestamp(timestamp / 1000, tz=UTC)


FUTURE_OCCURRED_AT = (
    "occurred_at: Datetime should not be more than 5 minutes in the future "
    "(of the record's timestamp)"
)


def _defaulted_in_future(record: Record) -> str:
    return (
        f"occurred_at: absent, and the record's timestamp ({record.timestamp} ms), its "
        f"default, is more than 5 minutes in the future"
    )


# 9999-12-31T23:59:59.999Z: the last millisecond a datetime can hold.
_MAX_RECORD_TIMESTAMP_MS = 253_402_300_799_999


def parse_records(
    records: Iterable[Record], *, accepted_types: frozenset[str], max_event_bytes: int
) -> tuple[list[Parsed], list[Rejected]]:
    """Validate every record; return the events (in record order) and the rejections.

    Nothing a record holds may stop its neighbours: a record whose parsing raises anything
    (a bug the validation did not foresee) is rejected as ``unprocessable``.
    """
    parsed: list[Parsed] = []
    rejected: list[Rejected] = []
    append_times: dict[int, datetime] = {}
    now = common.utc_now()  # by its module: tests pin it there
    for record in records:
        try:
            outcome = _parse_record(record, accepted_types, max_event_bytes, append_times, now)
        except Exception as exc:
            outcome = unprocessable(record, exc)
        if isinstance(outcome, Parsed):
            parsed.append(outcome)
        else:
            rejected.append(outcome)
    return parsed, rejected


def unprocessable(record: Record, exc: BaseException, event_type: str = "unknown") -> Rejected:
    """The rejection of a record that made the worker's own code (or Postgres) fail."""
    return Rejected(record, "unprocessable", describe_exception(exc), event_type)


def describe_exception(exc: BaseException) -> str:
    """One line naming the exception, storable as Postgres text (no NUL)."""
    detail = f"{type(exc).__name__}: {exc}".replace("\x00", "\\0").replace("\n", " ")
    return detail if len(detail) <= 500 else detail[:499] + "\u2026"


def _parse_record(  # noqa: PLR0911 -- one return per way a record can fail, in order
    record: Record,
    accepted_types: frozenset[str],
    max_event_bytes: int,
    append_times: dict[int, datetime],
    now: datetime,
) -> Parsed | Rejected:
    value: bytes | None = record.value
    if value is None:
        return Rejected(record, "invalid_json", "record has no value (tombstone)")
    if len(value) > max_event_bytes:
        return Rejected(
            record,
            "payload_too_large",
            f"record value is {len(value)} bytes, the limit is {max_event_bytes}",
        )
    try:
        event = parse_event(value)
    except EventRejected as exc:
        return Rejected(record, exc.reason, exc.detail)
    if event.type not in accepted_types:
        return Rejected(
            record,
            "wrong_topic",
            f"{event.type} events are not accepted on {record.topic}",
            event.type,
        )
    key: bytes | None = record.key
    if key != event.customer_ref.encode():
        shown = "no key" if key is None else f"key {key[:64]!r}"
        return Rejected(
            record,
            "key_mismatch",
            f"record has {shown}, expected the customer_ref {event.customer_ref!r}",
            event.type,
        )
    # Records of a batch share few timestamps (milliseconds): one datetime each.
    sent_at = append_times.get(record.timestamp)
    if sent_at is None:
        sent_at = record_time(record)
        if sent_at is not None:
            append_times[record.timestamp] = sent_at
    occurred_at = event.occurred_at
    if occurred_at is None:
        if sent_at is None:
            return Rejected(
                record,
                "invalid_event",
                f"occurred_at: Field required, as the record's timestamp "
                f"({record.timestamp} ms) is not a time to default it to",
                event.type,
            )
        occurred_at = sent_at
        if occurred_at - now > MAX_FUTURE_SKEW:
            return Rejected(record, "invalid_event", _defaulted_in_future(record), event.type)
    elif sent_at is not None and sent_at < now and occurred_at - sent_at > MAX_FUTURE_SKEW:
        # Judged against the record's timestamp, not only this worker's clock (which the
        # model checked): the verdict on a record is the same whenever it is read, live,
        # late or in a replay.
        return Rejected(record, "invalid_event", FUTURE_OCCURRED_AT, event.type)
    payload = canonical_json(event)
    return Parsed(
        record,
        event,
        payload,
        hashlib.sha256(payload).digest(),
        raw_digest(value),
        occurred_at,
        event.type,
        event.dedup_key,
    )
