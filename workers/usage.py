"""Step 3 for the usage topic: usage, credit grants and voids through the token ledger.

Per batch, in one transaction: 1. dedup rows for each event type (set-wise, like charges);
2. lock the batch's customers (sorted) and load their balances and open grants; 3. run the
new events through ``workers.ledger`` in record order; 4. write the ledger entries (COPY),
grant and customer changes, and alerts with their outbox rows. About ten round trips per
batch, whatever its size.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from schemas.events import CreditGrantEvent, CreditVoidEvent, UsageEvent
from schemas.outputs import AlertCause, AlertEvent
from workers.db import QUERIES
from workers.dedupe import Verdict, resolve_races, verdicts_from_report
from workers.ledger import Alert, Customer, Entry, Grant, Ledger
from workers.parse import Parsed

LEDGER_COLUMNS = Entry._fields  # the entries are the COPY's rows, as they are


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

    async def apply(self, conn: Any, events: list[Parsed], alerts: Counter[str]) -> list[Verdict]:
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
        conn: Any,
        query: str,
        race_query: str,
        events: list[Parsed],
        rows: list[tuple[Any, ...]],
    ) -> tuple[list[Verdict | None], list[int | None]]:
        # rows: one tuple per event, in the field order of the statement's input row type.
        report = await conn.fetchrow(QUERIES[query], rows, self.topic)
        verdicts, raced = verdicts_from_report(report, events)
        if raced:
            keys = [parsed.dedup_key for parsed in events]
            await resolve_races(conn, QUERIES[race_query], keys, verdicts, raced)
        return verdicts, report["new_ids"]

    async def _record_usage(
        self, conn: Any, events: list[Parsed]
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
        self, conn: Any, events: list[Parsed]
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
        self, conn: Any, events: list[Parsed]
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

    async def _refused_before(self, conn: Any, voids: list[Parsed]) -> set[tuple[int, int]]:
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
        conn: Any,
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


def effective_time(event: CreditGrantEvent, occurred_at: datetime) -> datetime:
    """When a grant's tokens become usable: ``effective_at`` if given, else when the grant
    occurred, but never after its expiry. A grant that expired before it occurred (an old
    purchase sent by a backfill) is effective at its expiry, so it is credited and expired
    at once instead of breaking the rule that a grant expires no earlier than it starts."""
    if event.effective_at is not None:
        return event.effective_at
    expires_at = event.expires_at
    if expires_at is not None and expires_at < occurred_at:
        return expires_at
    return occurred_at


def new_grant(grant_id: int, event: CreditGrantEvent, occurred_at: datetime) -> Grant:
    return Grant(
        grant_id=grant_id,
        reference=event.reference,
        tokens=event.tokens,
        remaining=0,
        effective_at=effective_time(event, occurred_at),
        expires_at=event.expires_at,
        priority=event.priority,
        cost_basis=event.cost_basis,
        status="pending",
    )


async def load_ledger(
    conn: Any,
    customer_refs: Sequence[str],
    void_targets: Sequence[tuple[str, str]] = (),
    *,
    exclude: set[int] | None = None,
) -> Ledger:
    """Lock ``customer_refs`` (creating the missing) and load them with their open grants."""
    refs = list(customer_refs)
    rows = await conn.fetch(QUERIES["lock_customers"], refs)
    if len(rows) < len(set(refs)):
        # Created by another transaction while the statement waited: committed now, so the
        # same statement, with a snapshot of its own, finds and locks them.
        found = {row["customer_ref"] for row in rows}
        rows += await conn.fetch(QUERIES["lock_customers"], [r for r in refs if r not in found])
    now = rows[0]["now"]
    customers = {
        row["customer_ref"]: Customer(
            row["customer_ref"],
            row["balance"],
            row["overage"],
            row["ledger_seq"],
            row["low_balance_threshold"],
            reload_threshold=row["reload_threshold"],
        )
        for row in rows
    }
    grant_rows = await conn.fetch(
        QUERIES["load_open_grants"],
        list(customer_refs),
        [t[0] for t in void_targets],
        [t[1] for t in void_targets],
    )
    for row in grant_rows:
        if exclude and row["grant_id"] in exclude:
            continue  # inserted by this batch: the ledger adds it when its event comes
        customers[row["customer_ref"]].grants.append(
            Grant(
                row["grant_id"],
                row["reference"],
                row["tokens"],
                row["remaining"],
                row["effective_at"],
                row["expires_at"],
                row["priority"],
                row["cost_basis"],
                row["status"],
            )
        )
    return Ledger(customers, now)


async def write_ledger(conn: Any, ledger: Ledger, *, alerts_topic: str) -> None:
    """Persist what ``ledger`` produced: entries, grants, customers, alerts + outbox."""
    changes = ledger.changes
    if changes.entries:
        await conn.copy_records_to_table(
            "ledger_entries", columns=LEDGER_COLUMNS, records=changes.entries
        )
    grants = [g for c in ledger.customers.values() for g in _all_grants(c) if g.changed]
    if grants:
        await conn.execute(
            QUERIES["update_grants"],
            [g.grant_id for g in grants],
            [g.remaining for g in grants],
            [g.status for g in grants],
        )
    customers = [c for c in ledger.customers.values() if c.changed]
    if customers:
        await conn.execute(
            QUERIES["update_customers"],
            [c.customer_ref for c in customers],
            [c.balance for c in customers],
            [c.overage for c in customers],
            [c.seq for c in customers],
        )
    if changes.alerts:
        await record_alerts(conn, changes.alerts, ledger.now, alerts_topic=alerts_topic)
    if changes.reloads:
        await conn.execute(
            QUERIES["request_reloads"], list(changes.reloads), list(changes.reloads.values())
        )


def _all_grants(customer: Customer) -> list[Grant]:
    # Grants leave customer.grants when they expire or are voided; the ledger keeps them in
    # `finished` so their final state is written too.
    return customer.grants + customer.finished


async def record_alerts(conn: Any, alerts: list[Alert], at: datetime, *, alerts_topic: str) -> None:
    messages = [
        AlertEvent(
            type=a.type,
            alert_id=a.alert_id,
            customer_ref=a.customer_ref,
            balance=a.balance,
            previous_balance=a.previous_balance,
            threshold=a.threshold,
            cause=AlertCause(type=a.cause_type, reference=a.cause_reference),
            at=at,
            detail=a.detail,
        )
        .model_dump_json()
        .encode()
        for a in alerts
    ]
    await conn.execute(
        QUERIES["record_alerts"],
        [a.alert_id for a in alerts],
        [a.type for a in alerts],
        [a.customer_ref for a in alerts],
        [a.balance for a in alerts],
        [a.previous_balance for a in alerts],
        [a.threshold for a in alerts],
        [a.cause_type for a in alerts],
        [a.cause_reference for a in alerts],
        [a.seq for a in alerts],
        [None if a.detail is None else orjson.dumps(a.detail).decode() for a in alerts],
        messages,
        alerts_topic,
    )
