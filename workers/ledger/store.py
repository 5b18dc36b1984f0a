"""The ledger's store: lock customers and load them with their open grants, then write what
the rules produced (entries by COPY, grant and customer changes, alerts with their outbox
rows, reload requests). The usage handler, the expiry worker and the reloads worker all go
through it, so the three never disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import orjson

from schemas.events import CreditGrantEvent
from schemas.outputs import AlertCause, AlertEvent
from workers.db import QUERIES, Connection
from workers.ledger.rules import Alert, Customer, Entry, Grant, Ledger

LEDGER_COLUMNS = Entry._fields  # the entries are the COPY's rows, as they are


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
    conn: Connection,
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


async def write_ledger(conn: Connection, ledger: Ledger, *, alerts_topic: str) -> None:
    """Persist what ``ledger`` produced: entries, grants, customers, alerts + outbox."""
    changes = ledger.changes
    if changes.entries:
        await conn.copy_records_to_table(
            "ledger_entries", columns=LEDGER_COLUMNS, records=changes.entries
        )
    grants = [g for c in ledger.customers.values() for g in _all_grants(c) if g.changed]
    customers = [c for c in ledger.customers.values() if c.changed]
    if grants or customers:
        await conn.execute(
            QUERIES["update_balances"],
            [g.grant_id for g in grants],
            [g.remaining for g in grants],
            [g.status for g in grants],
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


async def record_alerts(
    conn: Connection, alerts: list[Alert], at: datetime, *, alerts_topic: str
) -> None:
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
