"""The token ledger, as pure computation: no I/O, so every rule is unit-tested directly.

The usage worker loads the state of the customers in a batch (balance, overage, grants
with tokens left), feeds this module the batch's new events in record order, and writes
back what it produced: ledger entries, grant and customer changes, alerts. Alerts are
computed event by event, so a batch in which usage drains a balance and a grant restores
it yields depleted, then recovered: never coalesced.

Every entry records three deltas: ``amount`` (the balance), ``grant_delta`` (the tokens
left in ``grant_id``) and ``overage_delta`` (the customer's overage). So for every
customer ``balance = sum(amount) = sum(grant remaining) - overage``, and for every usage
event one can read which grants paid for it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal, NamedTuple

EntryKind = Literal["grant", "overage_settlement", "usage", "expiry", "void"]
# "active": effective, with tokens left; "used": effective, its last token gone (0008).
GrantStatus = Literal["pending", "active", "used", "expired", "voided"]
AlertKind = Literal[
    "credit_balance_depleted",
    "credit_balance_recovered",
    "credit_balance_low",
    "auto_reload_succeeded",
    "auto_reload_failed",
    "auto_reload_disabled",
]

# The expiry key of every grant that never expires: equal for all of them (see consumption_key).
_NEVER = datetime.min.replace(tzinfo=UTC)

# alert_id = uuid5(namespace, customer/seq/type): the same crossing always gets the same id.
ALERT_NAMESPACE = uuid.UUID("6f0d6a4e-8d1b-4c55-9a57-0c1e2c3a7b10")


@dataclass(slots=True)
class Grant:
    """A grant as the ledger sees it. ``remaining`` counts credited tokens only: a pending
    grant (not yet effective) has ``remaining == 0`` until it is activated."""

    grant_id: int
    reference: str
    tokens: int
    remaining: int
    effective_at: datetime
    expires_at: datetime | None
    priority: int
    cost_basis: Decimal
    status: GrantStatus
    changed: bool = False

    def consumption_key(self) -> tuple[bool, datetime, int, Decimal, datetime, int]:
        """SPEC order: soonest expiry (never last), priority, lower cost basis, oldest.

        Grants that never expire all share one expiry key, so that priority and cost basis
        decide among them; age (effective time, then arrival) only breaks the last tie.
        """
        expires = self.expires_at
        if expires is None:
            return (True, _NEVER, self.priority, self.cost_basis, self.effective_at, self.grant_id)
        return (False, expires, self.priority, self.cost_basis, self.effective_at, self.grant_id)


@dataclass(slots=True)
class Customer:
    customer_ref: str
    balance: int
    overage: int
    seq: int  # ledger entries so far; the next entry gets seq + 1
    low_threshold: int | None
    # Set only while auto-reload is enabled; keyword-only, after the state proper.
    reload_threshold: int | None = field(default=None, kw_only=True)
    grants: list[Grant] = field(default_factory=list)  # pending or active, with tokens left
    finished: list[Grant] = field(default_factory=list)  # expired or voided while loaded
    changed: bool = False


class Entry(NamedTuple):
    """One ledger entry, its fields in the order of the ``ledger_entries`` COPY: the writer
    sends the entries as they are. A NamedTuple is built in C, where a frozen dataclass sets
    each of its eleven fields through object.__setattr__: one or more per usage event."""

    customer_ref: str
    seq: int
    kind: EntryKind
    amount: int
    grant_id: int | None
    grant_delta: int
    overage_delta: int
    reference: str  # the event (or grant, for expiry) that caused it
    usage_id: int | None  # the causing usage event, for kind "usage"
    void_id: int | None  # the causing void, for kind "void"
    balance_after: int


@dataclass(slots=True, frozen=True)
class Alert:
    alert_id: str
    type: AlertKind
    customer_ref: str
    balance: int
    previous_balance: int
    threshold: int | None
    cause_type: str
    cause_reference: str | None
    seq: int | None  # the ledger entry it reports on; None for auto-reload outcomes
    detail: dict[str, Any] | None = None


@dataclass(slots=True)
class Changes:
    """What applying events produced, to be written in the batch's transaction."""

    entries: list[Entry] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    # Customers left below their auto-reload threshold by an event, with the first such
    # event's reference. The writer requests one reload each (never two in flight).
    reloads: dict[str, str] = field(default_factory=dict)


class Ledger:
    """Applies events to loaded customer state and collects the changes."""

    def __init__(self, customers: dict[str, Customer], now: datetime) -> None:
        self.customers = customers
        self.now = now
        self.changes = Changes()
        # Customers already brought to ``now``: ``now`` is fixed for a ledger's life, and a
        # grant added later is brought to ``now`` by ``grant`` itself, so once is enough.
        self._current: set[str] = set()

    # --- events -----------------------------------------------------------------------------

    def usage(self, customer_ref: str, reference: str, tokens: int, usage_id: int) -> None:
        """Consume ``tokens`` from grants in SPEC order; the rest is overage."""
        customer = self._prepare(customer_ref)
        before = customer.balance
        left = tokens
        for grant in self._consumable(customer):
            if left == 0:
                break
            take = min(left, grant.remaining)
            if take:
                self._entry(customer, "usage", -take, grant, -take, 0, reference, usage_id)
                left -= take
        if left:
            self._entry(customer, "usage", -left, None, 0, left, reference, usage_id)
        self._crossings(customer, before, "usage", reference)

    def grant(self, customer_ref: str, grant: Grant, reference: str) -> None:
        """Add a new grant (``remaining == 0``); if it is effective now, credit it, and let it
        pay the overage first. A grant whose expiry has passed is credited and expired,
        paying nothing."""
        customer = self._prepare(customer_ref)
        grant.status = "pending"
        grant.changed = True
        customer.grants.append(grant)
        if grant.effective_at > self.now:
            return
        if grant.expires_at is None or grant.expires_at > self.now:
            self._activate(customer, grant, "credit_grant", reference)
            return
        # Expired before it arrived: both steps are in the ledger, but they are one event,
        # so its alerts are those of the balance before the credit and after the expiry
        # (alerts are computed event by event): no recovered-then-depleted pair for tokens
        # the customer never held. Nor do they pay overage: they were never spendable, and
        # a balance counts only unexpired grants, whatever order the events came in.
        before = customer.balance
        self._activate(customer, grant, "credit_grant", reference, judge=False, settle=False)
        self._expire(customer, grant, judge=False)
        self._crossings(customer, before, "credit_grant", reference)

    def void(self, customer_ref: str, grant_reference: str, reference: str, void_id: int) -> bool:
        """Remove what is left of a grant (a refund). False when the customer has no such
        grant with tokens left, pending or active (the event is then a dead letter)."""
        customer = self._prepare(customer_ref)
        grant = next((g for g in customer.grants if g.reference == grant_reference), None)
        if grant is None:
            return False
        before = customer.balance
        if grant.status == "active" and grant.remaining:
            self._entry(
                customer, "void", -grant.remaining, grant, -grant.remaining, 0, reference, void_id
            )
        grant.remaining = 0
        grant.status = "voided"
        grant.changed = True
        customer.grants.remove(grant)
        customer.finished.append(grant)
        self._crossings(customer, before, "credit_void", reference)
        return True

    def tick(self, customer_ref: str) -> None:
        """Bring a customer to ``now``: activate and expire grants whose time has come."""
        self._prepare(customer_ref)

    # --- internals ----------------------------------------------------------------------------

    def _prepare(self, customer_ref: str) -> Customer:
        """The customer at ``now``: due grants activated, expired ones expired, in time order."""
        customer = self.customers.get(customer_ref)
        if customer is None:
            customer = Customer(customer_ref, 0, 0, 0, None)
            self.customers[customer_ref] = customer
        if customer_ref in self._current:
            return customer
        self._current.add(customer_ref)
        due: list[tuple[datetime, int, Grant]] = []
        for grant in customer.grants:
            if grant.status == "pending" and grant.effective_at <= self.now:
                due.append((grant.effective_at, 0, grant))
            if grant.expires_at is not None and grant.expires_at <= self.now:
                due.append((grant.expires_at, 1, grant))
        for _, kind, grant in sorted(due, key=lambda item: (item[0], item[1], item[2].grant_id)):
            if kind == 0:
                self._activate(customer, grant, "grant_effective", grant.reference)
            else:
                self._expire(customer, grant)
        return customer

    def _consumable(self, customer: Customer) -> list[Grant]:
        grants = customer.grants
        if len(grants) == 1:  # the common case, without the sort
            only = grants[0]
            return [only] if only.status == "active" and only.remaining > 0 else []
        return sorted(
            (g for g in customer.grants if g.status == "active" and g.remaining > 0),
            key=Grant.consumption_key,
        )

    def _activate(
        self,
        customer: Customer,
        grant: Grant,
        cause: str,
        reference: str,
        *,
        judge: bool = True,
        settle: bool = True,
    ) -> None:
        before = customer.balance
        grant.status = "active"
        self._entry(customer, "grant", grant.tokens, grant, grant.tokens, 0, reference, None)
        if customer.overage and settle:
            settled = min(customer.overage, grant.remaining)
            self._entry(
                customer, "overage_settlement", 0, grant, -settled, -settled, reference, None
            )
        if judge:
            self._crossings(customer, before, cause, reference)

    def _expire(self, customer: Customer, grant: Grant, *, judge: bool = True) -> None:
        if grant.status == "pending":  # expired before it ever became effective
            grant.status = "expired"
            grant.changed = True
            customer.grants.remove(grant)
            customer.finished.append(grant)
            return
        before = customer.balance
        if grant.remaining:
            self._entry(
                customer,
                "expiry",
                -grant.remaining,
                grant,
                -grant.remaining,
                0,
                grant.reference,
                None,
            )
        grant.status = "expired"
        grant.changed = True
        customer.grants.remove(grant)
        customer.finished.append(grant)
        if judge:
            self._crossings(customer, before, "expiry", grant.reference)

    def _entry(
        self,
        customer: Customer,
        kind: EntryKind,
        amount: int,
        grant: Grant | None,
        grant_delta: int,
        overage_delta: int,
        reference: str,
        source_id: int | None,
    ) -> None:
        customer.seq += 1
        customer.balance += amount
        customer.overage += overage_delta
        customer.changed = True
        if grant is not None:
            grant.remaining += grant_delta
            grant.changed = True
            if grant.remaining == 0 and grant.status == "active":
                grant.status = "used"
        self.changes.entries.append(
            Entry(
                customer.customer_ref,
                customer.seq,
                kind,
                amount,
                None if grant is None else grant.grant_id,
                grant_delta,
                overage_delta,
                reference,
                source_id if kind == "usage" else None,
                source_id if kind == "void" else None,
                customer.balance,
            )
        )

    def _crossings(self, customer: Customer, before: int, cause: str, reference: str) -> None:
        """Edge-triggered alerts for one event's change of balance."""
        after = customer.balance
        if before > 0 >= after:
            self._alert(customer, "credit_balance_depleted", before, None, cause, reference)
        elif before <= 0 < after:
            self._alert(customer, "credit_balance_recovered", before, None, cause, reference)
        threshold = customer.low_threshold
        if threshold is not None and before >= threshold > after:
            self._alert(customer, "credit_balance_low", before, threshold, cause, reference)
        reload_at = customer.reload_threshold
        if reload_at is not None and after < reload_at:
            self.changes.reloads.setdefault(customer.customer_ref, reference)

    def _alert(
        self,
        customer: Customer,
        kind: AlertKind,
        before: int,
        threshold: int | None,
        cause: str,
        reference: str,
    ) -> None:
        alert_id = uuid.uuid5(
            ALERT_NAMESPACE, f"{customer.customer_ref}\x1f{customer.seq}\x1f{kind}"
        )
        self.changes.alerts.append(
            Alert(
                str(alert_id),
                kind,
                customer.customer_ref,
                customer.balance,
                before,
                threshold,
                cause,
                reference,
                customer.seq,
            )
        )
