"""The dead-letter path: a Postgres row with the raw bytes, reason, detail and source
position, and (through the outbox, in the same transaction) a record on ``billing.dlq``
carrying the original key and bytes with headers naming the reason."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from workers.db import QUERIES, Connection
from workers.ingest.parse import Rejected, record_time
from workers.kafka import encode_headers

HEADER_PREFIX = "chargeline."
# Postgres keeps the whole record; billing.dlq gets at most this much of a huge one.
DLQ_VALUE_LIMIT = 64 * 1024


def dlq_record(rejected: Rejected) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The value and headers of the billing.dlq record for one rejection."""
    record = rejected.record
    value: bytes = record.value or b""
    headers = [
        (name, value_ or b"")
        for name, value_ in (record.headers or ())
        if not name.startswith(HEADER_PREFIX)
    ]
    headers += [
        (HEADER_PREFIX + "reason", rejected.reason.encode()),
        (HEADER_PREFIX + "detail", rejected.detail.encode()[:1000]),
        (HEADER_PREFIX + "source.topic", record.topic.encode()),
        (HEADER_PREFIX + "source.partition", str(record.partition).encode()),
        (HEADER_PREFIX + "source.offset", str(record.offset).encode()),
    ]
    if len(value) > DLQ_VALUE_LIMIT:
        headers.append((HEADER_PREFIX + "truncated", str(len(value)).encode()))
        value = value[:DLQ_VALUE_LIMIT]
    return value, headers


async def record_dead_letters(
    conn: Connection, dead: Sequence[Rejected], *, dlq_topic: str
) -> Counter[str]:
    """Record every rejection once (by source position); return new dead letters by reason."""
    if not dead:
        return Counter()
    columns: list[list[Any]] = [[] for _ in range(11)]
    for rejected in dead:
        record = rejected.record
        dlq_value, dlq_headers = dlq_record(rejected)
        row = (
            record.topic,
            record.partition,
            record.offset,
            record.key,
            record.value,
            encode_headers(list(record.headers or ())),
            record_time(record),
            rejected.reason,
            # Postgres text cannot hold NUL, which a detail may quote (a field's name).
            rejected.detail.replace("\x00", "\\0"),
            dlq_value,
            encode_headers(dlq_headers),
        )
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    rows = await conn.fetch(QUERIES["record_dead_letters"], *columns, dlq_topic)
    conflicts = [(r, r.conflict) for r in dead if r.conflict is not None]
    if conflicts:
        await conn.execute(
            QUERIES["record_conflicts"],
            [r.event_type for r, _ in conflicts],
            ["\x1f".join(c.dedup_key) for _, c in conflicts],
            [c.original_payload for _, c in conflicts],
            [c.conflicting_payload for _, c in conflicts],
            [r.record.topic for r, _ in conflicts],
            [r.record.partition for r, _ in conflicts],
            [r.record.offset for r, _ in conflicts],
        )
    return Counter({row["reason"]: row["recorded"] for row in rows})
