"""The fault tests' independent expected state: what the database must hold after a load,
computed from the records the test published, from first principles, without any code of
``workers/``.

A test builds a :class:`Load` (valid events, exact repeats, conflicts and poison records,
each poison record with the dead-letter reason the test meant it to have), publishes it in
order, injects its fault, then calls :func:`check`: the database must hold exactly the
:func:`expected` state, and `chargeline verify`'s invariants must hold too.

The rules, from SPEC.md section 3 to 5:
- a dedup key (charges ``(flow_id, reference)``, usage and grants ``(customer_ref,
  reference)``, each type its own namespace) is applied the first time it is seen; the
  same event again is a duplicate (nothing changes), another payload under the same key is
  a ``reference_conflict`` dead letter;
- a charge of a flow that does not exist or is paused is a dead letter;
- per customer, in record order, a grant adds its tokens and a usage removes its tokens
  (plain sums: no expiry, no priorities matter for the total); a depleted alert fires when
  the balance goes from > 0 to <= 0, a recovered alert when it goes from <= 0 to > 0;
- a poison record is dead-lettered once, with the reason the test gave it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from tests.support import assert_invariants, charge, grant, usage
from workers.settings import Settings

Event = dict[str, Any]
KafkaRecord = tuple[bytes | None, bytes | None]
BALANCE_ALERTS = ("credit_balance_depleted", "credit_balance_recovered")


@dataclass(frozen=True)
class Sent:
    """One published record: its topic ("charges" or "usage"), key and value; the event it
    carries (None for poison) or the dead-letter reason the test expects (poison only)."""

    topic: str
    key: bytes | None
    value: bytes | None
    event: Event | None = None
    reason: str | None = None


@dataclass
class Load:
    """The records of a test, in publication order."""

    sent: list[Sent] = field(default_factory=list)

    def add(self, event: Event, *, topic: str | None = None) -> Sent:
        """A valid event (or a repeat of one), keyed by its customer_ref."""
        kind = topic or ("charges" if event["type"] == "charge" else "usage")
        item = Sent(kind, event["customer_ref"].encode(), orjson.dumps(event), event)
        self.sent.append(item)
        return item

    def charge(self, flow: str, customer: str, reference: str, amount: int) -> Sent:
        return self.add(charge(flow, customer, reference, amount))

    def usage(self, customer: str, reference: str, tokens: int) -> Sent:
        return self.add(usage(customer, reference, tokens))

    def grant(self, customer: str, reference: str, tokens: int) -> Sent:
        return self.add(grant(customer, reference, tokens))

    def poison(self, topic: str, key: bytes | None, value: bytes | None, reason: str) -> Sent:
        """A record the workers must dead-letter with ``reason``."""
        item = Sent(topic, key, value, None, reason)
        self.sent.append(item)
        return item

    def repeat(self, item: Sent) -> Sent:
        """The same record again (an exact duplicate, or a poison record at a new offset)."""
        self.sent.append(item)
        return item

    def extend(self, items: list[Sent]) -> None:
        self.sent.extend(items)

    def records(self, topic: str, items: list[Sent] | None = None) -> list[KafkaRecord]:
        """(key, value) of ``items`` (default: all) on ``topic``, in order."""
        return [
            (s.key, s.value) for s in (self.sent if items is None else items) if s.topic == topic
        ]

    @property
    def valid(self) -> list[Sent]:
        return [s for s in self.sent if s.event is not None]


@dataclass
class State:
    """What the apply path wrote, reduced to what the fault tests compare."""

    charges: dict[tuple[str, str], int]
    usage: set[tuple[str, str]]
    grants: set[tuple[str, str]]
    balances: dict[str, int]
    alerts: dict[str, list[str]]
    dead_letters: Counter[str]
    # Not compared with the database, for the tests' own checks and prints:
    duplicates: int = 0
    conflicts: int = 0

    @property
    def rows(self) -> dict[str, int]:
        """Row counts by table, as :func:`wait_applied` waits for them."""
        return {
            "charges": len(self.charges),
            "usage_events": len(self.usage),
            "grants": len(self.grants),
            "dead_letters": sum(self.dead_letters.values()),
        }

    def summary(self) -> str:
        alerts = sum(len(a) for a in self.alerts.values())
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(self.dead_letters.items()))
        return (
            f"charges={len(self.charges)} usage={len(self.usage)} grants={len(self.grants)} "
            f"balances={len(self.balances)} alerts={alerts} dead_letters[{reasons}]"
        )


def _dedup_key(event: Event) -> tuple[str, str, str]:
    if event["type"] == "charge":
        return ("charge", event["flow_id"], event["reference"])
    return (event["type"], event["customer_ref"], event["reference"])


def expected(load: Load | list[Sent], *, flows: dict[str, str] | None = None) -> State:
    """The state a correct pipeline reaches from ``load``; ``flows`` maps flow ids to their
    status ("active" or "paused"; a flow not named is unknown). Default: every flow active."""
    sent = load.sent if isinstance(load, Load) else load
    seen: dict[tuple[str, str, str], Event] = {}
    state = State({}, set(), set(), {}, defaultdict(list), Counter())
    balance: dict[str, int] = defaultdict(int)
    for item in sent:
        if item.event is None:
            assert item.reason is not None, "a poison record needs its expected reason"
            state.dead_letters[item.reason] += 1
            continue
        event = item.event
        key = _dedup_key(event)
        if key in seen:
            if seen[key] == event:
                state.duplicates += 1
            else:
                state.conflicts += 1
                state.dead_letters["reference_conflict"] += 1
            continue
        if event["type"] == "charge":
            status = "active" if flows is None else flows.get(event["flow_id"])
            if status != "active":
                state.dead_letters["flow_paused" if status == "paused" else "unknown_flow"] += 1
                continue
        seen[key] = event
        _apply(state, balance, event)
    state.balances = dict(balance)
    state.alerts = dict(state.alerts)
    return state


def _apply(state: State, balance: dict[str, int], event: Event) -> None:
    """One new event: a charge recorded, or a ledger step with its sign-crossing alert."""
    customer = event["customer_ref"]
    if event["type"] == "charge":
        state.charges[(event["flow_id"], event["reference"])] = event["amount"]
        return
    if event["type"] == "usage":
        state.usage.add((customer, event["reference"]))
        delta = -event["tokens"]
    elif event["type"] == "credit_grant":
        state.grants.add((customer, event["reference"]))
        delta = event["tokens"]
    else:
        raise AssertionError(f"expected() does not model {event['type']} events")
    before = balance[customer]
    after = balance[customer] = before + delta
    if before > 0 >= after:
        state.alerts[customer].append("credit_balance_depleted")
    elif before <= 0 < after:
        state.alerts[customer].append("credit_balance_recovered")


def applied(load: Load, *, flows: dict[str, str] | None = None) -> list[Sent]:
    """The records whose event was applied: the first occurrence of each dedup key, for a
    charge only if its flow is active. Re-publishing them must change nothing."""
    seen: set[tuple[str, str, str]] = set()
    firsts: list[Sent] = []
    for item in load.valid:
        assert item.event is not None
        key = _dedup_key(item.event)
        if key in seen:
            continue
        is_charge = item.event["type"] == "charge"
        if is_charge and flows is not None and flows.get(item.event["flow_id"]) != "active":
            continue
        seen.add(key)
        firsts.append(item)
    return firsts


async def observe(settings: Settings) -> tuple[State, dict[str, int]]:
    """The state in the database, and the raw row counts (a key applied twice would collapse
    in the dicts and sets of ``State`` but show in these counts)."""
    conn = await asyncpg.connect(settings.dsn)
    try:
        charges = await conn.fetch("SELECT flow_id, reference, amount FROM charges")
        usage_rows = await conn.fetch("SELECT customer_ref, reference FROM usage_events")
        grant_rows = await conn.fetch("SELECT customer_ref, reference FROM grants")
        balances = await conn.fetch("SELECT customer_ref, balance FROM customers")
        alerts = await conn.fetch(
            "SELECT customer_ref, type FROM alerts WHERE type = ANY($1::text[]) "
            "ORDER BY customer_ref, ledger_seq",
            list(BALANCE_ALERTS),
        )
        dead = await conn.fetch("SELECT reason FROM dead_letters")
    finally:
        await conn.close()
    observed_alerts: dict[str, list[str]] = defaultdict(list)
    for row in alerts:
        observed_alerts[row["customer_ref"]].append(row["type"])
    state = State(
        charges={(r["flow_id"], r["reference"]): r["amount"] for r in charges},
        usage={(r["customer_ref"], r["reference"]) for r in usage_rows},
        grants={(r["customer_ref"], r["reference"]) for r in grant_rows},
        # A customer row exists once it had a ledger event; one that never did is at 0.
        balances={r["customer_ref"]: r["balance"] for r in balances},
        alerts=dict(observed_alerts),
        dead_letters=Counter(r["reason"] for r in dead),
    )
    rows = {
        "charges": len(charges),
        "usage_events": len(usage_rows),
        "grants": len(grant_rows),
        "dead_letters": len(dead),
    }
    return state, rows


async def check(settings: Settings, want: State) -> str:
    """Assert the database holds exactly ``want`` (every valid event applied once, every
    invalid one dead-lettered once, balances and alerts exact) and that `chargeline verify`
    finds nothing; return a one-line summary of what was checked, for the test to print."""
    got, rows = await observe(settings)
    assert rows == want.rows, f"row counts: got {rows}, expected {want.rows}"
    assert got.charges == want.charges, _diff("charges", got.charges, want.charges)
    assert got.usage == want.usage, f"usage events differ: {len(got.usage ^ want.usage)} keys"
    assert got.grants == want.grants, f"grants differ: {len(got.grants ^ want.grants)} keys"
    assert got.balances == want.balances, _diff("balances", got.balances, want.balances)
    assert got.alerts == want.alerts, _diff("alerts", got.alerts, want.alerts)
    assert got.dead_letters == want.dead_letters, (
        f"dead letters: got {dict(got.dead_letters)}, expected {dict(want.dead_letters)}"
    )
    await assert_invariants(settings)
    return want.summary() + " + chargeline verify ok"


def _diff(what: str, got: dict[Any, Any], want: dict[Any, Any]) -> str:
    keys = sorted({*got, *want} - {k for k in got if got.get(k) == want.get(k)}, key=str)
    shown = {str(k): (got.get(k), want.get(k)) for k in keys[:10]}
    return f"{what}: {len(keys)} differ (got, expected): {shown}"


async def row_counts(settings: Settings) -> dict[str, int]:
    conn = await asyncpg.connect(settings.dsn)
    try:
        row = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM charges) AS charges, "
            "(SELECT count(*) FROM usage_events) AS usage_events, "
            "(SELECT count(*) FROM grants) AS grants, "
            "(SELECT count(*) FROM dead_letters) AS dead_letters"
        )
    finally:
        await conn.close()
    assert row is not None
    return dict(row.items())


async def wait_applied(
    settings: Settings, want: State, *, timeout: float, settle: float = 0.5
) -> float:
    """Wait until the row counts reach ``want``'s (then ``settle`` seconds more, so that a
    row applied twice would have time to show); return the seconds waited."""
    started = time.monotonic()
    deadline = started + timeout
    target = want.rows
    while True:
        counts = await row_counts(settings)
        if all(counts[name] >= n for name, n in target.items()):
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s: rows {counts}, expected {target}")
        await asyncio.sleep(0.2)
    waited = time.monotonic() - started
    await asyncio.sleep(settle)
    return waited


def mixed_load(
    rng: random.Random,
    events: int,
    *,
    customers: int = 60,
    flow: str = "flow_a",
    prefix: str = "",
    repeats: float = 0.05,
    poison: float = 0.005,
    conflicts: float = 0.0,
) -> Load:
    """About ``events`` records: charges, usage and grants (balances cross zero often),
    with exact repeats of earlier events, a few invalid JSON records and, if asked, events
    re-using an earlier reference with another payload mixed in."""
    load = Load()
    for n in range(events):
        customer = f"c{rng.randrange(customers):03d}"
        roll = rng.random()
        if roll < poison:
            load.poison(
                rng.choice(("charges", "usage")), customer.encode(), b"{oops", "invalid_json"
            )
        elif roll < poison + repeats and load.valid:
            load.repeat(rng.choice(load.valid))
        elif roll < poison + repeats + conflicts and load.valid:
            original = rng.choice(load.valid).event
            assert original is not None
            field_ = "amount" if original["type"] == "charge" else "tokens"
            load.add({**original, field_: original[field_] + 1})
        elif roll < 0.45:
            load.charge(flow, customer, f"{prefix}ch{n}", rng.randint(1, 999))
        elif roll < 0.52:
            load.grant(customer, f"{prefix}g{n}", rng.randint(100, 2_000))
        else:
            load.usage(customer, f"{prefix}u{n}", rng.randint(1, 150))
    return load
