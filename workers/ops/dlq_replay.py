"""``chargeline dlq replay``: re-publish stored dead letters (original key, bytes and headers)
to their source topic, and mark them replayed in the transaction that locked them: never
twice.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from workers import db
from workers.kafka import decode_headers, input_topics, make_producer
from workers.logs import get_logger
from workers.settings import Settings

log = get_logger("chargeline.replay")

# Reasons a second attempt can clear: the flow was resumed or created, the grant arrived,
# the bug that made a record unprocessable was fixed. The others (malformed, conflicting,
# too large) would only come back as new dead letters.
RETRYABLE_REASONS = ("flow_paused", "unknown_flow", "unknown_grant", "unprocessable")
REPLAYED_FROM_HEADER = "chargeline.replayed-from"
DLQ_PAGE = 500
# Rows kept for the report's lists (counts are always complete).
LISTED_ROWS = 1000


@dataclass
class DeadLetterReplayReport:
    dry_run: bool
    reasons: list[str] | None
    replayed: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    by_topic: Counter[str] = field(default_factory=Counter)
    replayed_ids: list[int] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    not_found: list[int] = field(default_factory=list)
    already_replayed: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "reasons": self.reasons,
            "replayed": self.replayed,
            "by_reason": dict(sorted(self.by_reason.items())),
            "by_topic": dict(sorted(self.by_topic.items())),
            "ids": self.replayed_ids[:LISTED_ROWS],
            "skipped": self.skipped[:LISTED_ROWS],
            "not_found": self.not_found,
            "already_replayed": self.already_replayed,
        }


async def replay_dead_letters(
    settings: Settings,
    *,
    reasons: list[str] | None = None,
    ids: list[int] | None = None,
    since: datetime | None = None,
    dry_run: bool = False,
    page_size: int = DLQ_PAGE,
) -> DeadLetterReplayReport:
    """Re-publish dead letters not yet replayed to their source topic; mark them replayed.

    Per page, in one transaction: lock the rows (SKIP LOCKED), publish them with acks from all
    replicas, mark them, commit. A crash between the acks and the commit leaves them unmarked
    and a re-run publishes them again: the input's dedup makes that second copy a duplicate.
    Without ``reasons`` or ``ids`` only ``RETRYABLE_REASONS`` are taken. A charge whose flow
    is still paused or unknown, and a void whose grant is still missing, are skipped and
    stay unreplayed, for a run after the fix.
    """
    if reasons is None and ids is None:
        reasons = list(RETRYABLE_REASONS)
    report = DeadLetterReplayReport(dry_run=dry_run, reasons=reasons)
    topics = set(input_topics(settings).values())
    conn = await db.connect(settings.dsn)
    producer = None if dry_run else make_producer(settings, client_id="chargeline-dlq-replay")
    try:
        if ids is not None:
            rows = await conn.fetch(db.QUERIES["dead_letters_by_id"], ids)
            found = {row["id"]: row["replayed_at"] for row in rows}
            report.not_found = sorted(set(ids) - set(found))
            report.already_replayed = sorted(i for i, at in found.items() if at is not None)
        if producer is not None:
            await producer.start()
        last_id = 0
        while True:
            # The page's rows stay locked until this transaction ends; a dry run writes
            # nothing, so committing it only releases them.
            async with conn.transaction():
                rows = await conn.fetch(
                    db.QUERIES["dead_letters_to_replay"], last_id, reasons, ids, since, page_size
                )
                if not rows:
                    break
                last_id = rows[-1]["id"]
                sendable = await _sendable(conn, rows, settings, topics, report)
                if producer is not None and sendable:
                    futures = [
                        await producer.send(
                            row["topic"],
                            key=_bytes(row["record_key"]),
                            value=_bytes(row["record_value"]),
                            headers=_replay_headers(row),
                        )
                        for row in sendable
                    ]
                    await asyncio.gather(*futures)
                    ids_sent = [row["id"] for row in sendable]
                    await conn.execute(db.QUERIES["dead_letters_mark_replayed"], ids_sent)
            for row in sendable:
                report.replayed += 1
                report.by_reason[row["reason"]] += 1
                report.by_topic[row["topic"]] += 1
                report.replayed_ids.append(row["id"])
    finally:
        if producer is not None:
            await producer.stop()
        await conn.close()
    log.info("dead_letters_replayed", replayed=report.replayed, dry_run=dry_run,
             by_reason=dict(report.by_reason), skipped=len(report.skipped))  # fmt: skip
    return report


async def _sendable(
    conn: db.Connection,
    rows: list[db.Row],
    settings: Settings,
    topics: set[str],
    report: DeadLetterReplayReport,
) -> list[db.Row]:
    """The rows worth publishing now; the others are noted in ``report.skipped``."""
    flows: dict[int, str] = {}
    for row in rows:
        if row["topic"] == settings.topic_charges and row["reason"] in (
            "flow_paused",
            "unknown_flow",
        ):
            flow_id = _flow_id(row["record_value"])
            if flow_id is not None:
                flows[row["id"]] = flow_id
    statuses = {
        r["flow_id"]: r["status"]
        for r in await conn.fetch(db.QUERIES["flow_statuses"], sorted(set(flows.values())))
    } if flows else {}  # fmt: skip
    # A void whose grant is still missing would only be dead-lettered again, as a new
    # letter that the next run would replay in turn.
    voids = {
        row["id"]: target
        for row in rows
        if row["topic"] == settings.topic_usage and row["reason"] == "unknown_grant"
        if (target := _void_target(row["record_value"])) is not None
    }
    voidable = {
        (r["customer_ref"], r["reference"])
        for r in await conn.fetch(
            db.QUERIES["voidable_grants"],
            [customer for customer, _ in voids.values()],
            [grant for _, grant in voids.values()],
        )
    } if voids else set()  # fmt: skip
    sendable = []
    for row in rows:
        why = None
        if row["topic"] not in topics:
            why = f"{row['topic']} is not an input topic here"
        elif row["id"] in flows:
            status = statuses.get(flows[row["id"]])
            if status != "active":
                why = f"flow {flows[row['id']]!r} is {status or 'unknown'}"
        elif row["id"] in voids and voids[row["id"]] not in voidable:
            customer, grant = voids[row["id"]]
            why = f"customer {customer!r} has no grant {grant!r} a void can apply to"
        if why is None:
            sendable.append(row)
        else:
            report.skipped.append({"id": row["id"], "reason": row["reason"], "why": why})
    return sendable


def _void_target(value: Any) -> tuple[str, str] | None:
    """(customer_ref, grant_reference) of a credit_void record, or None."""
    try:
        event = orjson.loads(bytes(value))
    except (orjson.JSONDecodeError, TypeError):
        return None
    if not isinstance(event, dict):
        return None
    customer, grant = event.get("customer_ref"), event.get("grant_reference")
    return (customer, grant) if isinstance(customer, str) and isinstance(grant, str) else None


def _flow_id(value: Any) -> str | None:
    try:
        event = orjson.loads(bytes(value))
    except (orjson.JSONDecodeError, TypeError):
        return None
    flow_id = event.get("flow_id") if isinstance(event, dict) else None
    return flow_id if isinstance(flow_id, str) else None


def _bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


def _replay_headers(row: db.Row) -> list[tuple[str, bytes]]:
    headers = [
        (k, v) for k, v in decode_headers(row["record_headers"]) if k != REPLAYED_FROM_HEADER
    ]
    return [*headers, (REPLAYED_FROM_HEADER, str(row["id"]).encode())]
