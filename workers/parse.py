"""Step 1 of a batch: turn raw Kafka records into validated events or rejections.

Nothing here touches a server. A record that cannot become an event is data, not a crash:
it becomes a ``Rejected`` with a reason code and a one-line detail, and goes to the
dead-letter path while its neighbours carry on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from schemas.events import EventRejected, InputEvent, canonical_json, parse_event

# aiokafka's ConsumerRecord is generic and untyped; these are the attributes we rely on.
Record = Any


@dataclass(slots=True)
class Parsed:
    """A valid event and where it came from."""

    record: Record
    event: InputEvent
    payload: bytes  # canonical JSON of the event as sent, stored with the event
    fingerprint: bytes  # sha256 of payload: equal fingerprints, same payload
    raw_digest: bytes  # of the record value as it arrived, stored too (workers/known.py)
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


def raw_digest(value: bytes) -> bytes:
    """The digest stored with an event's dedup row, of the record value as it arrived:
    blake2b in 16 bytes, ample to tell one record's bytes from another's."""
    return hashlib.blake2b(value, digest_size=16).digest()


def record_time(record: Record) -> datetime:
    return datetime.fromtimestamp(record.timestamp / 1000, tz=UTC)


def parse_records(
    records: Iterable[Record], *, accepted_types: frozenset[str], max_event_bytes: int
) -> tuple[list[Parsed], list[Rejected]]:
    """Validate every record; return the events (in record order) and the rejections."""
    parsed: list[Parsed] = []
    rejected: list[Rejected] = []
    append_times: dict[int, datetime] = {}
    for record in records:
        value: bytes | None = record.value
        if value is None:
            rejected.append(Rejected(record, "invalid_json", "record has no value (tombstone)"))
            continue
        if len(value) > max_event_bytes:
            rejected.append(
                Rejected(
                    record,
                    "payload_too_large",
                    f"record value is {len(value)} bytes, the limit is {max_event_bytes}",
                )
            )
            continue
        try:
            event = parse_event(value)
        except EventRejected as exc:
            rejected.append(Rejected(record, exc.reason, exc.detail))
            continue
        if event.type not in accepted_types:
            rejected.append(
                Rejected(
                    record,
                    "wrong_topic",
                    f"{event.type} events are not accepted on {record.topic}",
                    event.type,
                )
            )
            continue
        key: bytes | None = record.key
        if key != event.customer_ref.encode():
            shown = "no key" if key is None else f"key {key[:64]!r}"
            rejected.append(
                Rejected(
                    record,
                    "key_mismatch",
                    f"record has {shown}, expected the customer_ref {event.customer_ref!r}",
                    event.type,
                )
            )
            continue
        occurred_at = event.occurred_at
        if occurred_at is None:
            # Records of a batch share few timestamps (milliseconds): one datetime each.
            occurred_at = append_times.get(record.timestamp)
            if occurred_at is None:
                occurred_at = append_times[record.timestamp] = record_time(record)
        payload = canonical_json(event)
        parsed.append(
            Parsed(
                record,
                event,
                payload,
                hashlib.sha256(payload).digest(),
                raw_digest(value),
                occurred_at,
                event.type,
                event.dedup_key,
            )
        )
    return parsed, rejected
