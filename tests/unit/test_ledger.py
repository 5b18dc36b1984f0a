"""The token ledger's rules, on pure state (SPEC.md sections 4 and 5)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from workers.ledger.rules import Customer, Grant, Ledger

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
_ids = itertools.count(1)


def grant(
    reference: str,
    tokens: int,
    *,
    expires_in: timedelta | None = None,
    effective_in: timedelta = timedelta(0),
    priority: int = 0,
    cost_basis: str = "0.0001",
    created: datetime = NOW - timedelta(days=1),
) -> Grant:
    return Grant(
        grant_id=next(_ids),
        reference=reference,
        tokens=tokens,
        remaining=0,
        effective_at=created + effective_in if effective_in else created,
        expires_at=None if expires_in is None else NOW + expires_in,
        priority=priority,
        cost_basis=Decimal(cost_basis),
        status="pending",
    )


def check_invariants(ledger: Ledger) -> None:
    for customer in ledger.customers.values():
        entries = [e for e in ledger.changes.entries if e.customer_ref == customer.customer_ref]
        assert customer.balance == sum(e.amount for e in entries)
        assert customer.overage == sum(e.overage_delta for e in entries) >= 0
        assert customer.balance == sum(g.remaining for g in customer.grants) - customer.overage
        assert [e.seq for e in entries] == list(range(1, len(entries) + 1))


def alerts(ledger: Ledger) -> list[tuple[str, int, int]]:
    return [
        (a.type.removeprefix("credit_balance_"), a.previous_balance, a.balance)
        for a in ledger.changes.alerts
    ]


def test_orb_token_guide_scenario() -> None:
    """100K purchased tokens (a year) and a monthly plan allocation (sooner): usage eats the
    plan first; past zero, one depleted; a purchase recovers once and pays the overage."""
    ledger = Ledger({}, NOW)
    purchase = grant("purchase-789", 100_000, expires_in=timedelta(days=365))
    plan = grant("plan-nov", 20_000, expires_in=timedelta(days=8), cost_basis="0")
    ledger.grant("user_123", purchase, "purchase-789")
    ledger.grant("user_123", plan, "plan-nov")
    ledger.usage("user_123", "req-1", 15_000, usage_id=1)
    assert (plan.remaining, purchase.remaining) == (5_000, 100_000)
    ledger.usage("user_123", "req-2", 10_000, usage_id=2)  # 5K from plan, 5K from purchase
    assert (plan.remaining, purchase.remaining) == (0, 95_000)
    paid_by = [(e.grant_id, -e.amount) for e in ledger.changes.entries if e.reference == "req-2"]
    assert paid_by == [(plan.grant_id, 5_000), (purchase.grant_id, 5_000)]
    ledger.usage("user_123", "req-3", 95_120, usage_id=3)  # 120 past zero
    customer = ledger.customers["user_123"]
    assert (customer.balance, customer.overage) == (-120, 120)
    ledger.usage("user_123", "req-4", 10, usage_id=4)  # deeper: no second depleted alert
    second = grant("purchase-790", 100_000, expires_in=timedelta(days=365))
    ledger.grant("user_123", second, "purchase-790")
    assert (customer.balance, customer.overage, second.remaining) == (99_870, 0, 99_870)
    assert alerts(ledger) == [
        ("recovered", 0, 100_000),
        ("depleted", 95_000, -120),
        ("recovered", -130, 99_870),
    ]
    check_invariants(ledger)


def test_usage_then_grant_in_one_batch_gives_depleted_then_recovered() -> None:
    customers = {"c": Customer("c", 50, 0, 1, None, [])}
    first = grant("g0", 50)
    first.status, first.remaining = "active", 50
    customers["c"].grants.append(first)
    ledger = Ledger(customers, NOW)
    ledger.usage("c", "u1", 80, usage_id=1)
    ledger.grant("c", grant("g1", 100), "g1")
    assert alerts(ledger) == [("depleted", 50, -30), ("recovered", -30, 70)]
    assert [a.seq for a in ledger.changes.alerts] == [3, 5]


def test_consumption_order_expiry_then_priority_then_cost_then_age() -> None:
    ledger = Ledger({}, NOW)
    never = grant("never", 10)
    late = grant("late", 10, expires_in=timedelta(days=30))
    soon_p1 = grant("soon-p1", 10, expires_in=timedelta(days=2), priority=1)
    soon_p0_dear = grant("soon-p0-dear", 10, expires_in=timedelta(days=2), cost_basis="0.5")
    soon_p0_cheap_new = grant(
        "soon-p0-cheap-new", 10, expires_in=timedelta(days=2), cost_basis="0.1"
    )
    soon_p0_cheap_old = grant(
        "soon-p0-cheap-old",
        10,
        expires_in=timedelta(days=2),
        cost_basis="0.1",
        created=NOW - timedelta(days=3),
    )
    for g in (never, late, soon_p1, soon_p0_dear, soon_p0_cheap_new, soon_p0_cheap_old):
        ledger.grant("c", g, g.reference)
    ledger.usage("c", "u", 60, usage_id=1)
    order = [e.grant_id for e in ledger.changes.entries if e.kind == "usage"]
    assert order == [
        g.grant_id
        for g in (soon_p0_cheap_old, soon_p0_cheap_new, soon_p0_dear, soon_p1, late, never)
    ]
    check_invariants(ledger)


def test_overage_is_paid_first_by_the_next_grant_even_when_it_is_smaller() -> None:
    ledger = Ledger({}, NOW)
    ledger.usage("c", "u1", 500, usage_id=1)
    small = grant("small", 200)
    ledger.grant("c", small, "small")
    customer = ledger.customers["c"]
    assert (customer.balance, customer.overage, small.remaining) == (-300, 300, 0)
    assert alerts(ledger) == []  # 0 -> -500 -> -300: never crossed zero
    check_invariants(ledger)


def test_expiry_can_deplete_and_is_one_ledger_entry() -> None:
    expiring = grant("g", 100, expires_in=timedelta(hours=1))
    ledger = Ledger({}, NOW)
    ledger.grant("c", expiring, "g")
    ledger.usage("c", "u", 30, usage_id=1)
    later = Ledger(ledger.customers, NOW + timedelta(hours=2))
    later.tick("c")
    assert [(e.kind, e.amount) for e in later.changes.entries] == [("expiry", -70)]
    assert alerts(later) == [("depleted", 70, 0)]
    assert later.changes.alerts[0].cause_type == "expiry"
    assert expiring.status == "expired"


def test_a_grant_expired_before_it_arrived_is_one_event_for_the_alerts() -> None:
    """Credited and expired at once, both in the ledger; judged as one event: the balance
    before the credit against the balance after the expiry."""
    ledger = Ledger({"c": Customer("c", 0, 0, 0, low_threshold=50)}, NOW)
    ledger.grant("c", grant("past", 40, expires_in=-timedelta(days=1)), "past")
    assert [(e.kind, e.amount) for e in ledger.changes.entries] == [("grant", 40), ("expiry", -40)]
    assert alerts(ledger) == []
    # Above the low threshold, an expired grant leaves the balance where it was: no alert.
    ledger.grant("c", grant("live", 100), "live")
    ledger.grant("c", grant("past-2", 40, expires_in=-timedelta(hours=1)), "past-2")
    assert alerts(ledger) == [("recovered", 0, 100)]
    # In overage, it pays none of it (its tokens were never spendable) and all of it expires:
    # the outcome is the one of the grant arriving before the usage.
    ledger.usage("c", "u", 130, usage_id=1)
    ledger.grant("c", grant("past-3", 40, expires_in=-timedelta(hours=1)), "past-3")
    customer = ledger.customers["c"]
    assert (customer.balance, customer.overage) == (-30, 30)
    assert [e.kind for e in ledger.changes.entries[-2:]] == ["grant", "expiry"]
    assert alerts(ledger)[1:] == [("depleted", 100, -30), ("low", 100, -30)]
    check_invariants(ledger)


def test_pending_grant_becomes_effective_later() -> None:
    future = grant("future", 100, effective_in=timedelta(days=2))
    ledger = Ledger({}, NOW)
    ledger.grant("c", future, "future")
    assert ledger.changes.entries == [] and future.status == "pending"
    later = Ledger(ledger.customers, NOW + timedelta(days=3))
    later.tick("c")
    assert [(e.kind, e.amount) for e in later.changes.entries] == [("grant", 100)]
    assert alerts(later) == [("recovered", 0, 100)]


def test_void_removes_what_is_left() -> None:
    ledger = Ledger({}, NOW)
    g = grant("g", 100)
    ledger.grant("c", g, "g")
    ledger.usage("c", "u", 40, usage_id=1)
    assert ledger.void("c", "g", "refund-1", void_id=1)
    assert [(e.kind, e.amount) for e in ledger.changes.entries][-1] == ("void", -60)
    assert alerts(ledger)[-1] == ("depleted", 60, 0)
    assert not ledger.void("c", "missing", "refund-2", void_id=2)
    check_invariants(ledger)


def test_low_balance_alert_fires_once_per_crossing_and_rearms() -> None:
    customers = {"c": Customer("c", 0, 0, 0, 1_000, [])}
    ledger = Ledger(customers, NOW)
    ledger.grant("c", grant("g1", 5_000), "g1")
    ledger.usage("c", "u1", 4_500, usage_id=1)  # 5000 -> 500: crosses below 1000
    ledger.usage("c", "u2", 100, usage_id=2)  # still below: nothing
    ledger.grant("c", grant("g2", 2_000), "g2")  # 2400: re-armed
    ledger.usage("c", "u3", 1_500, usage_id=3)  # 900: fires again
    assert [a for a in alerts(ledger) if a[0] == "low"] == [
        ("low", 5_000, 500),
        ("low", 2_400, 900),
    ]


def test_alert_ids_are_stable() -> None:
    def run() -> list[str]:
        ledger = Ledger({}, NOW)
        ledger.grant("c", Grant(1, "g", 10, 0, NOW, None, 0, Decimal(0), "pending"), "g")
        ledger.usage("c", "u", 20, usage_id=1)
        return [a.alert_id for a in ledger.changes.alerts]

    assert run() == run()
    assert len(set(run())) == 2


def test_reload_requested_once_per_batch_when_left_below_threshold() -> None:
    customer = Customer("c", 0, 0, 0, None, reload_threshold=1_000)
    ledger = Ledger({"c": customer}, NOW)
    ledger.grant("c", grant("g", 5_000), "g")
    ledger.usage("c", "u1", 3_000, usage_id=1)  # 2000: above
    assert ledger.changes.reloads == {}
    ledger.usage("c", "u2", 1_500, usage_id=2)  # 500: below
    ledger.usage("c", "u3", 100, usage_id=3)  # still below: same request
    assert ledger.changes.reloads == {"c": "u2"}


def test_a_grant_whose_last_token_goes_is_used_and_can_still_be_voided() -> None:
    """'active' means tokens left (what the open-grant indexes find, 0008); the grant that
    pays the last token becomes 'used', by usage or by settling an overage."""
    ledger = Ledger({}, NOW)
    small, large = grant("small", 30), grant("large", 100)
    ledger.grant("c", small, "small")
    ledger.usage("c", "u1", 20, usage_id=1)
    assert (small.status, small.remaining) == ("active", 10)
    ledger.usage("c", "u2", 50, usage_id=2)  # 10 from small, 40 past zero
    assert (small.status, small.remaining) == ("used", 0)
    ledger.grant("c", large, "large")  # pays the overage of 40 first
    assert (large.status, large.remaining) == ("active", 60)
    settled = grant("settled", 5)
    ledger.usage("c", "u3", 65, usage_id=3)  # 60 from large, 5 past zero
    ledger.grant("c", settled, "settled")  # all of it pays the overage
    assert (large.status, settled.status, settled.remaining) == ("used", "used", 0)
    entries_before = len(ledger.changes.entries)
    assert ledger.void("c", "small", "void-small", void_id=1)
    assert small.status == "voided" and len(ledger.changes.entries) == entries_before
    check_invariants(ledger)


def test_grants_that_never_expire_are_consumed_by_priority_then_cost_basis_not_age() -> None:
    """Among never-expiring grants, age only breaks the last tie: a newer grant of lower
    priority (or cheaper, at equal priority) pays first."""
    ledger = Ledger({}, NOW)
    old = grant("g-old", 100, priority=3, cost_basis="0.0001", created=NOW - timedelta(days=9))
    new = grant("g-new", 100, priority=0, cost_basis="0", created=NOW - timedelta(days=1))
    ledger.grant("x", old, "g-old")
    ledger.grant("x", new, "g-new")
    ledger.usage("x", "u1", 50, usage_id=1)
    assert (old.remaining, new.remaining) == (100, 50)
    ledger.void("x", "g-new", "v1", void_id=1)
    assert ledger.customers["x"].balance == 100
    assert old.remaining == 100
    cheap = grant("g-cheap", 10, priority=3, cost_basis="0.00001")
    ledger.grant("x", cheap, "g-cheap")
    ledger.usage("x", "u2", 5, usage_id=2)
    assert (old.remaining, cheap.remaining) == (100, 5)
    check_invariants(ledger)


def test_a_grant_that_expires_is_consumed_before_any_that_never_does() -> None:
    ledger = Ledger({}, NOW)
    never = grant("never", 100, priority=0, cost_basis="0")
    later = grant("later", 100, priority=9, cost_basis="1", expires_in=timedelta(days=3650))
    ledger.grant("x", never, "never")
    ledger.grant("x", later, "later")
    ledger.usage("x", "u1", 30, usage_id=1)
    assert (never.remaining, later.remaining) == (100, 70)
    check_invariants(ledger)
