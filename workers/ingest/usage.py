"""Step 3 for the usage topic: usage, credit grants and voids through the token ledger.

Per batch, in one transaction: 1. dedup rows for each event type (set-wise, like charges);
2. lock the batch's customers (sorted) and load their balances and open grants; 3. run the
new events through ``workers.ledger.rules`` in record order; 4. write the ledger entries (COPY),
grant and customer changes, and alerts with their outbox rows. About ten round trips per
batch, whatever its size.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import orjson

from schemas.events import CreditGrantEvent, CreditVoidEvent, UsageEvent
from workers.db import QUERIES, Connection, fetch_one
from workers.ingest.dedupe import Verdict, resolve_races, verdicts_from_report
from workers.ingest.parse import Parsed
from workers.ledger.rules import Ledger
from workers.ledger.store import effective_time, load_ledger, new_grant, write_ledger


@dataclass(slots=True)
class _Recorded:
    """The new events of one type: their index in the batch and their new row ids."""

    indexes: list[int]
    ids: list[int]


class UsageHandler:
    """Applies usage, credit_grant and credit_void events to the token ledger."""

    name = "usage"
    accepted_types = frozenset({"usage", "credit_grant", "credit_void"})

    def __init__(self, topic: str, alerts_topic: str) -> None:
        self.topic = topic
        self.alerts_topic = alerts_topic

    async def apply(
        self, conn: Connection, events: list[Parsed], alerts: Counter[str]
    ) -> list[Verdict]:
        if not events:
            return []
        verdicts: list[Verdict | None] = [None] * len(events)
        new: dict[int, int] = {}  # batch index -> new row id
        for event_type, record in (
            ("usage", self._record_usage),
            ("credit_grant", self._record_grants),
            ("credit_void", self._record_voids),
        ):
            indexes = [i for i, parsed in enumerate(events) if parsed.event_type == event_type]
            if not indexes:
                continue
            typed_verdicts, ids = await record(conn, [events[i] for i in indexes])
            for index, verdict, row_id in zip(indexes, typed_verdicts, ids, strict=True):
                verdicts[index] = verdict
                if row_id is not None:
                    new[index] = row_id
        if new:
            ledger = await self._apply_ledger(conn, events, new, verdicts)
            alerts.update(alert.type for alert in ledger.changes.alerts)
        assert all(verdict is not None for verdict in verdicts)
        return verdicts  # type: ignore[return-value]

    # --- 1. dedup rows ------------------------------------------------------------------------

    async def _record(
        self,
        conn: Connection,
        query: str,
        race_query: str,
        events: list[Parsed],
        rows: list[tuple[Any, ...]],
    ) -> tuple[list[Verdict | None], list[int | None]]:
        # rows: one tuple per event, in the field order of the statement's input row type.
        report = await fetch_one(conn, QUERIES[query], rows, self.topic)
        verdicts, raced = verdicts_from_report(report, events)
        if raced:
            keys = [parsed.dedup_key for parsed in events]
            await resolve_races(conn, QUERIES[race_query], keys, verdicts, raced)
        return verdicts, report["new_ids"]

    async def _record_usage(
        self, conn: Connection, events: list[Parsed]
    ) -> tuple[list[Verdict | None], list[int | None]]:
        rows = []
        for parsed in events:
            usage = parsed.event
            assert isinstance(usage, UsageEvent)
            rows.append(
                (
                    usage.customer_ref,
                    usage.reference,
                    usage.tokens,
                    usage.feature,
                    None if usage.metadata is None else orjson.dumps(usage.metadata).decode(),
                    parsed.occurred_at,
                    parsed.fingerprint,
                    parsed.record.partition,
                    parsed.record.offset,
                    parsed.raw_digest,
                )
            )
        return await self._record(conn, "record_usage", "stored_usage", events, rows)

    async def _record_grants(
        self, conn: Connection, events: list[Parsed]
    ) -> tuple[list[Verdict | None], list[int | None]]:
        rows = []
        for parsed in events:
            grant = parsed.event
            assert isinstance(grant, CreditGrantEvent)
            rows.append(
                (
                    grant.customer_ref,
                    grant.reference,
                    grant.tokens,
                    grant.cost_basis,
                    grant.currency,
                    effective_time(grant, parsed.occurred_at),
                    grant.expires_at,
                    grant.priority,
                    grant.source,
                    grant.description,
                    parsed.fingerprint,
                    parsed.payload.decode(),
                    parsed.record.partition,
                    parsed.record.offset,
                    parsed.raw_digest,
                )
            )
        return await self._record(conn, "record_grants", "stored_grants", events, rows)

    async def _record_voids(
        self, conn: Connection, events: list[Parsed]
    ) -> tuple[list[Verdict | None], list[int | None]]:
        rows = []
        for parsed in events:
            void = parsed.event
            assert isinstance(void, CreditVoidEvent)
            rows.append(
                (
                    void.customer_ref,
                    void.reference,
                    void.grant_reference,
                    void.reason,
                    parsed.fingerprint,
                    parsed.payload.decode(),
                    parsed.record.partition,
                    parsed.record.offset,
                    parsed.raw_digest,
                )
            )
        return await self._record(conn, "record_voids", "stored_voids", events, rows)

    # --- 2-4. the ledger ------------------------------------------------------------------------

    async def _refused_before(self, conn: Connection, voids: list[Parsed]) -> set[tuple[int, int]]:
        """The (partition, offset) of the voids already dead-lettered at their position: a
        void refused ``unknown_grant`` leaves no dedup row (so that ``dlq replay`` can apply
        it once its grant exists), so only its position tells a redelivery."""
        if not voids:
            return set()
        rows = await conn.fetch(
            QUERIES["dead_lettered_positions"],
            self.topic,
            [p.record.partition for p in voids],
            [p.record.offset for p in voids],
        )
        return {(row["partition"], row["offset"]) for row in rows}

    async def _apply_ledger(
        self,
        conn: Connection,
        events: list[Parsed],
        new: dict[int, int],
        verdicts: list[Verdict | None],
    ) -> Ledger:
        customer_refs = sorted({events[i].event.customer_ref for i in new})
        voids = [events[i].event for i in new if events[i].event_type == "credit_void"]
        void_targets = [(v.customer_ref, v.grant_reference) for v in voids]  # type: ignore[union-attr]
        # Only this batch's grants are left out of the load (the ledger adds each when its
        # event comes): usage and void ids come from other sequences, and one equal to an
        # open grant's id hid that grant from the batch, its usage going to overage instead.
        new_grants = {new[i] for i in new if events[i].event_type == "credit_grant"}
        ledger = await load_ledger(conn, customer_refs, void_targets, exclude=new_grants)
        refused = await self._refused_before(
            conn, [events[i] for i in new if events[i].event_type == "credit_void"]
        )
        dropped: list[int] = []
        for index in sorted(new):  # record order: per customer, the order it was produced in
            event, row_id = events[index].event, new[index]
            if isinstance(event, CreditVoidEvent) and _position(events[index]) in refused:
                # Refused when this record was first read (its grant came later); its
                # redelivery must change nothing: the dead letter stands, replayable.
                dropped.append(row_id)
                verdicts[index] = Verdict(rejection=_unknown_grant(event))
                continue
            if isinstance(event, UsageEvent):
                ledger.usage(event.customer_ref, event.reference, event.tokens, row_id)
            elif isinstance(event, CreditGrantEvent):
                ledger.grant(
                    event.customer_ref,
                    new_grant(row_id, event, events[index].occurred_at),
                    event.reference,
                )
            elif isinstance(event, CreditVoidEvent) and not ledger.void(
                event.customer_ref, event.grant_reference, event.reference, row_id
            ):
                dropped.append(row_id)
                verdicts[index] = Verdict(rejection=_unknown_grant(event))
        if dropped:
            await conn.execute(QUERIES["drop_voids"], dropped)
        await write_ledger(conn, ledger, alerts_topic=self.alerts_topic)
        return ledger


def _unknown_grant(void: CreditVoidEvent) -> tuple[str, str]:
    return (
        "unknown_grant",
        f"customer {void.customer_ref!r} has no open grant {void.grant_reference!r} to void",
    )


def _position(parsed: Parsed) -> tuple[int, int]:
    return (parsed.record.partition, parsed.record.offset)
