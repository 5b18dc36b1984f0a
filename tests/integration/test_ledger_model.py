"""The token ledger against a model of its contract (schemas/README.md: duplicates and
conflicts, the token ledger, alerts).

Random sequences of credit grants, usage, voids, exact re-sends and conflicting re-sends for
a few customers go through the real apply path (``BatchProcessor`` with the
``UsageHandler``, on a real Postgres), grouped into batches of random sizes. A small model
written from the contract, and sharing no code with ``workers.ledger.rules``, predicts what each
batch does. After every batch the database must agree with it: each customer's balance and
overage, the sum of its ledger entries, each grant's remaining tokens and status, which
grants paid for each usage event, the depleted and recovered alerts in ledger order, the
dead letters by reason, the conflicts kept, and the batch's outcome counts.

Ledger time is processing time: the transaction's ``now()``. Each customer with a new event
in a batch is first brought up to that time (due grants started, expired ones expired, in
time order), then its events are applied in record order. A batch whose outcome could
depend on the exact instant (a grant starting or expiring within the next seconds) runs in
a transaction of the test's own that reads ``now()`` first, so that the model uses that very
instant; the others go through ``BatchProcessor.transact``, as in the worker.

Where the contract is silent the model follows the decisions in schemas/README.md: a void removes
what is left of a pending, active or used grant, and a void of an expired, voided or unknown
grant is dead-lettered ``unknown_grant`` (its reference is not kept, so a re-send is a new
event); "oldest" means the earlier effective time, then the one recorded first; an alert
caused by a grant's start or expiry names the cause ``grant_effective`` or ``expiry``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

import asyncpg
import orjson
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from tests.support import assert_invariants, grant, rfc3339, usage
from workers import db
from workers.ingest.parse import BareRecord
from workers.ingest.processor import BatchProcessor, BatchResult
from workers.ingest.usage import UsageHandler
from workers.metrics import Metrics
from workers.settings import Settings

Event = dict[str, Any]
Key = tuple[str, str, str]  # (type, customer_ref, reference): the dedup key, per event type
# (type, previous_balance, balance, cause type, cause reference)
AlertRow = tuple[str, int, int, str, str]

# CHARGELINE_DEEP_TESTS=1 (make test-deep) runs ten times as many plans.
EXAMPLES = 40 * (10 if os.environ.get("CHARGELINE_DEEP_TESTS") == "1" else 1)
CUSTOMERS = 3
# Records are stamped as published this long before they are applied, as a consumer sees
# them; a grant without effective_at starts at its record's time.
PUBLISHED_BEFORE_MS = 50
# Longer than any batch takes: a grant time beyond this from the start of a batch cannot be
# reached while it runs.
BATCH_WINDOW = timedelta(seconds=5)
MAX_WAIT_MS = 1000  # per example, spent letting "near" times pass
# The expiry key of a grant that never expires: any value does, the flag before it already
# puts such grants last, and one value for all lets priority decide among them.
_NEVER = datetime.min.replace(tzinfo=UTC)


# --- the model ---------------------------------------------------------------------------------


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value)


@dataclass
class ModelGrant:
    reference: str
    tokens: int
    effective_at: datetime
    expires_at: datetime | None
    priority: int
    cost_basis: Decimal
    arrival: int  # how many grants were recorded before it
    remaining: int = 0
    status: str = "pending"

    def consumption_order(self) -> tuple[bool, datetime, int, Decimal, datetime, int]:
        # The contract's order: soonest expiry first (never-expiring last), then lower priority,
        # then lower cost basis, then oldest.
        never = self.expires_at is None
        expires = _NEVER if self.expires_at is None else self.expires_at
        return (never, expires, self.priority, self.cost_basis, self.effective_at, self.arrival)


@dataclass
class ModelCustomer:
    balance: int = 0
    overage: int = 0
    grants: dict[str, ModelGrant] = field(default_factory=dict)
    alerts: list[AlertRow] = field(default_factory=list)
    # (usage reference, paying grant's reference or None for overage, tokens), in order.
    payments: list[tuple[str, str | None, int]] = field(default_factory=list)


@dataclass(frozen=True)
class Sent:
    """An event as published: the model reads it as a producer wrote it."""

    event: Event
    timestamp_ms: int

    @property
    def key(self) -> Key:
        return (self.event["type"], self.event["customer_ref"], self.event["reference"])

    @property
    def canonical(self) -> bytes:
        return orjson.dumps(self.event, option=orjson.OPT_SORT_KEYS)


class LedgerModel:
    """Dedup, the ledger and the depleted/recovered alerts of the contract, in memory."""

    def __init__(self) -> None:
        self.customers: dict[str, ModelCustomer] = {}
        self.stored: dict[Key, bytes] = {}  # dedup key -> payload first recorded
        self.dead_letters: Counter[str] = Counter()
        self.conflicts = 0
        self.recorded_grants = 0

    def customer(self, ref: str) -> ModelCustomer:
        return self.customers.setdefault(ref, ModelCustomer())

    def apply(self, batch: Sequence[Sent], now: datetime) -> Counter[str]:
        """Apply one transaction's events at ledger time ``now``; return outcome counts."""
        outcomes: Counter[str] = Counter()
        firsts: set[Key] = set()
        new: list[Sent] = []
        repeats: list[Sent] = []
        for sent in batch:
            if sent.key in firsts:
                repeats.append(sent)
                continue
            firsts.add(sent.key)
            if sent.key in self.stored:
                outcomes[self._judge(sent)] += 1
            else:
                new.append(sent)
        for customer_ref in sorted({sent.event["customer_ref"] for sent in new}):
            self._bring_up_to(self.customer(customer_ref), now)
        refused: set[Key] = set()
        for sent in new:
            if self._apply(sent, now):
                self.stored[sent.key] = sent.canonical
                outcomes["recorded"] += 1
            else:
                refused.add(sent.key)
                self.dead_letters["unknown_grant"] += 1
                outcomes["rejected"] += 1
        for sent in repeats:
            if sent.key in refused:  # a copy of a refused void is refused the same way
                self.dead_letters["unknown_grant"] += 1
                outcomes["rejected"] += 1
            else:
                outcomes[self._judge(sent)] += 1
        return outcomes

    def _judge(self, sent: Sent) -> str:
        if self.stored[sent.key] == sent.canonical:
            return "duplicate"
        self.dead_letters["reference_conflict"] += 1
        self.conflicts += 1
        return "conflict"

    def _apply(self, sent: Sent, now: datetime) -> bool:
        event = sent.event
        customer = self.customer(event["customer_ref"])
        if event["type"] == "usage":
            self._use(customer, event["reference"], event["tokens"])
            return True
        if event["type"] == "credit_grant":
            occurred = datetime.fromtimestamp(sent.timestamp_ms / 1000, tz=UTC)
            expires = event.get("expires_at")
            effective = event.get("effective_at")
            new = ModelGrant(
                reference=event["reference"],
                tokens=event["tokens"],
                effective_at=occurred if effective is None else parse_time(effective),
                expires_at=None if expires is None else parse_time(expires),
                priority=event.get("priority", 0),
                cost_basis=Decimal(event["cost_basis"]),
                arrival=self.recorded_grants,
            )
            self.recorded_grants += 1
            customer.grants[new.reference] = new
            if new.effective_at <= now:
                if new.expires_at is not None and new.expires_at <= now:
                    # Expired before it arrived: credited and expired at once, one event, so
                    # one judgement of the balance before and after; no overage paid.
                    before = customer.balance
                    self._start(
                        customer, new, "credit_grant", new.reference, judge=False, settle=False
                    )
                    self._expire(customer, new, judge=False)
                    self._crossing(customer, before, "credit_grant", new.reference)
                else:
                    self._start(customer, new, "credit_grant", new.reference)
            return True
        assert event["type"] == "credit_void"
        return self._void(customer, event["reference"], event["grant_reference"], now)

    def _bring_up_to(self, customer: ModelCustomer, now: datetime) -> None:
        """Start the grants whose effective time has come and expire those whose expiry has,
        in time order (a start before an expiry at the same instant)."""
        due: list[tuple[datetime, int, int, ModelGrant]] = []
        for g in customer.grants.values():
            if g.status == "pending" and g.effective_at <= now:
                due.append((g.effective_at, 0, g.arrival, g))
            if g.status in ("pending", "active") and g.expires_at and g.expires_at <= now:
                due.append((g.expires_at, 1, g.arrival, g))
        for _, kind, _, g in sorted(due, key=lambda item: item[:3]):
            if kind == 0:
                self._start(customer, g, "grant_effective", g.reference)
            else:
                self._expire(customer, g)

    def _start(
        self, customer: ModelCustomer, g: ModelGrant, cause: str, reference: str, *,
        judge: bool = True, settle: bool = True,
    ) -> None:  # fmt: skip
        before = customer.balance
        g.status = "active"
        g.remaining = g.tokens
        customer.balance += g.tokens
        # A new grant pays the overage first (the balance already counts it as negative);
        # one that expired before it arrived pays nothing.
        settled = min(customer.overage, g.remaining) if settle else 0
        g.remaining -= settled
        customer.overage -= settled
        if g.remaining == 0:
            g.status = "used"
        if judge:
            self._crossing(customer, before, cause, reference)

    def _expire(self, customer: ModelCustomer, g: ModelGrant, *, judge: bool = True) -> None:
        if g.status == "pending":
            g.status = "expired"
            return
        before = customer.balance
        customer.balance -= g.remaining
        g.remaining = 0
        g.status = "expired"
        if judge:
            self._crossing(customer, before, "expiry", g.reference)

    def _use(self, customer: ModelCustomer, reference: str, tokens: int) -> None:
        before = customer.balance
        left = tokens
        active = [g for g in customer.grants.values() if g.status == "active"]
        for g in sorted(active, key=ModelGrant.consumption_order):
            if left == 0:
                break
            take = min(left, g.remaining)
            g.remaining -= take
            if g.remaining == 0:
                g.status = "used"
            left -= take
            customer.balance -= take
            customer.payments.append((reference, g.reference, take))
        if left:
            customer.overage += left
            customer.balance -= left
            customer.payments.append((reference, None, left))
        self._crossing(customer, before, "usage", reference)

    def _void(self, customer: ModelCustomer, reference: str, target: str, now: datetime) -> bool:
        g = customer.grants.get(target)
        if g is None or g.status in ("expired", "voided"):
            return False
        if g.status == "used" and g.expires_at is not None and g.expires_at <= now:
            g.status = "expired"  # it expired with nothing left: nothing to void
            return False
        before = customer.balance
        customer.balance -= g.remaining
        g.remaining = 0
        g.status = "voided"
        self._crossing(customer, before, "credit_void", reference)
        return True

    def _crossing(self, customer: ModelCustomer, before: int, cause: str, reference: str) -> None:
        after = customer.balance
        if before > 0 >= after:
            customer.alerts.append(("credit_balance_depleted", before, after, cause, reference))
        elif before <= 0 < after:
            customer.alerts.append(("credit_balance_recovered", before, after, cause, reference))

    def sensitive(self, batch: Sequence[Sent], low: datetime, high: datetime) -> bool:
        """True when a grant of the batch's customers starts or expires in (low, high]: then
        the outcome depends on the exact ledger time."""
        times: list[datetime | None] = []
        for customer_ref in {sent.event["customer_ref"] for sent in batch}:
            for g in self.customer(customer_ref).grants.values():
                times += [g.effective_at, g.expires_at]
        for sent in batch:
            if sent.event["type"] == "credit_grant":
                times.append(datetime.fromtimestamp(sent.timestamp_ms / 1000, tz=UTC))
                times += [
                    parse_time(sent.event[name])
                    for name in ("effective_at", "expires_at")
                    if name in sent.event
                ]
        return any(t is not None and low < t <= high for t in times)

    def expected_state(self, customer_refs: Sequence[str]) -> dict[str, Any]:
        state: dict[str, Any] = {
            "balances": {},
            "grants": {},
            "payments": {},
            "alerts": {},
            "dead_letters": dict(self.dead_letters),
            "conflicts": self.conflicts,
        }
        for ref in customer_refs:
            customer = self.customer(ref)
            state["balances"][ref] = (customer.balance, customer.overage, customer.balance)
            state["payments"][ref] = customer.payments
            state["alerts"][ref] = customer.alerts
            for g in customer.grants.values():
                state["grants"][(ref, g.reference)] = (g.remaining, g.status)
        return state


# --- the real path ---------------------------------------------------------------------------


async def database_state(
    conn: asyncpg.Connection, settings: Settings, customer_refs: Sequence[str]
) -> dict[str, Any]:
    """The same shape as ``LedgerModel.expected_state``, read from Postgres."""
    refs = list(customer_refs)
    state: dict[str, Any] = {
        "balances": dict.fromkeys(refs, (0, 0, 0)),
        "grants": {},
        "payments": {ref: [] for ref in refs},
        "alerts": {ref: [] for ref in refs},
    }
    for row in await conn.fetch(
        "SELECT c.customer_ref, c.balance, c.overage,"
        "       (SELECT coalesce(sum(e.amount), 0) FROM ledger_entries e"
        "        WHERE e.customer_ref = c.customer_ref) AS entries"
        " FROM customers c WHERE c.customer_ref = ANY($1::text[])",
        refs,
    ):
        state["balances"][row["customer_ref"]] = (row["balance"], row["overage"], row["entries"])
    for row in await conn.fetch(
        "SELECT customer_ref, reference, remaining, status FROM grants"
        " WHERE customer_ref = ANY($1::text[])",
        refs,
    ):
        state["grants"][(row["customer_ref"], row["reference"])] = (
            row["remaining"],
            row["status"],
        )
    for row in await conn.fetch(
        "SELECT e.customer_ref, e.reference, g.reference AS grant_reference, -e.amount AS tokens"
        " FROM ledger_entries e LEFT JOIN grants g ON g.grant_id = e.grant_id"
        " WHERE e.customer_ref = ANY($1::text[]) AND e.usage_id IS NOT NULL"
        " ORDER BY e.customer_ref, e.seq",
        refs,
    ):
        state["payments"][row["customer_ref"]].append(
            (row["reference"], row["grant_reference"], row["tokens"])
        )
    for row in await conn.fetch(
        "SELECT customer_ref, type, previous_balance, balance, cause_type, cause_reference"
        " FROM alerts WHERE customer_ref = ANY($1::text[])"
        " AND type IN ('credit_balance_depleted', 'credit_balance_recovered')"
        " ORDER BY customer_ref, ledger_seq",
        refs,
    ):
        state["alerts"][row["customer_ref"]].append(
            (
                row["type"],
                row["previous_balance"],
                row["balance"],
                row["cause_type"],
                row["cause_reference"],
            )
        )
    keys = [ref.encode() for ref in refs]
    state["dead_letters"] = {
        row["reason"]: row["n"]
        for row in await conn.fetch(
            "SELECT reason, count(*) AS n FROM dead_letters"
            " WHERE topic = $1 AND record_key = ANY($2::bytea[]) GROUP BY reason",
            settings.topic_usage,
            keys,
        )
    }
    state["conflicts"] = await conn.fetchval(
        "SELECT count(*) FROM conflicts WHERE topic = $1 AND dedup_key[1] = ANY($2::text[])",
        settings.topic_usage,
        refs,
    )
    return state


ApplyPath = Literal["auto", "worker", "own"]


class Harness:
    """One database for a whole test: each run (an example) has customers of its own."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, skew: timedelta) -> None:
        self.settings = settings
        self.pool = pool
        # How far the database's clock may be from ours (plus the measurement's own error).
        self.skew = skew
        self.offsets: Counter[int] = Counter()  # next offset per partition
        self.runs = 0

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, settings: Settings) -> AsyncIterator[Harness]:
        pool = await db.create_pool(settings.dsn)
        try:
            async with pool.acquire() as conn:
                before = datetime.now(UTC)
                server = await conn.fetchval("SELECT clock_timestamp()")
                after = datetime.now(UTC)
            skew = abs(server - (before + (after - before) / 2)) + (after - before)
            yield cls(settings, pool, skew)
        finally:
            await pool.close()

    def new_run(self, partitions: Sequence[int] = (0, 1, 2)) -> Run:
        self.runs += 1
        return Run(self, [f"m{self.runs}-{c}" for c in range(CUSTOMERS)], partitions)

    def next_offset(self, partition: int) -> int:
        offset = self.offsets[partition]
        self.offsets[partition] += 1
        return offset


class Run:
    """A sequence of batches for a few customers, checked against the model after each."""

    def __init__(self, harness: Harness, customers: list[str], partitions: Sequence[int]) -> None:
        self.harness = harness
        self.settings = harness.settings
        self.customers = customers
        self.partition_of = dict(zip(customers, partitions, strict=True))
        self.model = LedgerModel()
        self.processor = BatchProcessor(
            self.settings,
            [UsageHandler(self.settings.topic_usage, self.settings.topic_alerts)],
            Metrics(),
        )
        self.log: list[str] = []

    async def batch(self, events: Sequence[Event], *, path: ApplyPath = "auto") -> None:
        """Publish ``events`` as one batch, apply it, and compare the database with the model.

        Each part (lane) is applied in a transaction of its own: through
        ``BatchProcessor.transact`` (path "worker", for events with no grant time near now),
        in the test's own transaction (path "own"), or the first unless a grant time falls so
        near that the model must know the exact ledger time (path "auto")."""
        stamp = int(time.time() * 1000) - PUBLISHED_BEFORE_MS
        records: list[BareRecord] = []
        sent: dict[int, Sent] = {}
        for event in events:
            customer = event["customer_ref"]
            partition = self.partition_of.get(customer, 0)
            record = BareRecord(
                topic=self.settings.topic_usage,
                partition=partition,
                offset=self.harness.next_offset(partition),
                key=customer.encode(),
                value=orjson.dumps(event),
                timestamp=stamp,
            )
            records.append(record)
            sent[id(record)] = Sent(event, stamp)
        for part in self.processor.prepare(records):
            if part.unparsed is not None:
                members = {id(r) for r in part.unparsed}
            else:
                members = {id(p.record) for p in part.parsed} | {
                    id(r.record) for r in part.rejected
                }
            applied = [sent[id(r)] for r in records if id(r) in members]
            started = datetime.now(UTC)
            low, high = started - self.harness.skew, started + BATCH_WINDOW + self.harness.skew
            exact = path == "own" or (path == "auto" and self.model.sensitive(applied, low, high))
            result: BatchResult
            if exact:
                # As replay applies: the caller's transaction. Its now() is the ledger time.
                async with self.harness.pool.acquire() as conn, conn.transaction():
                    now = await conn.fetchval("SELECT now()")
                    result = await self.processor.apply(conn, [part])
            else:
                # The worker's path; no grant time falls near, so any instant of the
                # transaction gives the same outcome as this one.
                now = started
                result = await self.processor.transact(self.harness.pool, part)
            expected = self.model.apply(applied, now)
            self.log.append(
                f"transaction {len(self.log) + 1} ({'own' if exact else 'transact'}, "
                f"now={now.isoformat()}): "
                + "; ".join(orjson.dumps(s.event).decode() for s in applied)
            )
            outcomes = {k: v for k, v in result.outcome_totals().items() if v}
            assert outcomes == dict(expected), self.trace("outcomes")
        await self.check()

    async def check(self) -> None:
        async with self.harness.pool.acquire() as conn:
            actual = await database_state(conn, self.settings, self.customers)
        expected = self.model.expected_state(self.customers)
        for name in ("balances", "grants", "payments", "alerts", "dead_letters", "conflicts"):
            assert actual[name] == expected[name], self.trace(name)

    def trace(self, what: str) -> str:
        return f"{what} differ from the model after:\n" + "\n".join(self.log)


# --- events ------------------------------------------------------------------------------------


def void(customer: str, reference: str, grant_reference: str, reason: str = "refund") -> Event:
    return {
        "type": "credit_void",
        "customer_ref": customer,
        "reference": reference,
        "grant_reference": grant_reference,
        "reason": reason,
    }


ExpiryKind = Literal["none", "past", "near", "far"]
StartKind = Literal["default", "past", "near", "far"]
BatchEnd = Literal["no", "worker", "own"]  # go on; end the batch (transact / own transaction)


@dataclass(frozen=True)
class GrantStep:
    customer: int
    tokens: int
    priority: int = 0
    cost_basis: str = "0.0001"
    expiry: ExpiryKind = "none"
    start: StartKind = "default"
    expiry_ms: int = 0  # spreads the times of one kind, so that they rarely tie
    start_ms: int = 0


@dataclass(frozen=True)
class UsageStep:
    customer: int
    tokens: int


@dataclass(frozen=True)
class VoidStep:
    customer: int
    target: int  # which grant sent so far (modulo their number)
    of: Literal["own", "other", "unknown"]  # its customer's, another customer's, none


@dataclass(frozen=True)
class ResendStep:
    index: int  # which event sent so far (modulo their number)
    change: bool  # another payload under the same reference: a conflict
    reorder: bool  # the same payload in other bytes


@dataclass(frozen=True)
class WaitStep:
    ms: int


@dataclass(frozen=True)
class Skip:
    """Nothing: what shrinking turns the steps a counterexample does not need into."""


Step = GrantStep | UsageStep | VoidStep | ResendStep | WaitStep | Skip


@dataclass(frozen=True)
class Plan:
    partitions: tuple[int, int, int]  # of each customer; equal ones share a transaction
    steps: tuple[tuple[Step, BatchEnd], ...]

    def __repr__(self) -> str:
        # Without the skipped steps, a shrunk counterexample reads as the events it sends.
        steps = ", ".join(repr(item) for item in self.steps if not isinstance(item[0], Skip))
        return f"Plan(partitions={self.partitions!r}, steps=({steps},))"


def grant_times(step: GrantStep, origin: datetime) -> dict[str, str]:
    """effective_at and expires_at of a grant step, relative to the run's start."""
    start: datetime | None = {
        "default": None,
        "past": origin - timedelta(hours=1, milliseconds=step.start_ms),
        "near": origin + timedelta(milliseconds=30 + step.start_ms),
        "far": origin + timedelta(days=10, milliseconds=step.start_ms),
    }[step.start]
    expiry: datetime | None = {
        "none": None,
        "past": origin - timedelta(days=1, milliseconds=step.expiry_ms),
        "near": origin + timedelta(milliseconds=60 + step.expiry_ms),
        "far": origin + timedelta(days=30, milliseconds=step.expiry_ms),
    }[step.expiry]
    if start is not None and expiry is not None and expiry <= start:
        expiry = start + timedelta(milliseconds=1 + step.expiry_ms)  # valid events only
    times = {}
    if start is not None:
        times["effective_at"] = rfc3339(start)
    if expiry is not None:
        times["expires_at"] = rfc3339(expiry)
    return times


class Producer:
    """Turns a plan's steps into events for one run's customers."""

    def __init__(self, run: Run) -> None:
        self.customers = run.customers
        self.origin = datetime.now(UTC)
        self.sent: list[Event] = []  # every event but re-sends, in order
        self.grants: list[tuple[str, str]] = []  # (customer, reference) of every grant

    def event(self, step: Step, index: int) -> Event | None:
        event: Event | None = None
        if isinstance(step, GrantStep):
            customer, reference = self.customers[step.customer], f"g{index}"
            times = grant_times(step, self.origin)
            event = grant(
                customer,
                reference,
                step.tokens,
                cost_basis=step.cost_basis,
                priority=step.priority,
                **times,
            )
            self.grants.append((customer, reference))
        elif isinstance(step, UsageStep):
            event = usage(self.customers[step.customer], f"u{index}", step.tokens)
        elif isinstance(step, VoidStep):
            event = self.void(step, index)
        elif isinstance(step, ResendStep):
            return self.resend(step)
        if event is not None:
            self.sent.append(event)
        return event

    def void(self, step: VoidStep, index: int) -> Event:
        customer = self.customers[step.customer]
        target = f"g-unknown-{index}"
        if step.of != "unknown" and self.grants:
            owner, target = self.grants[step.target % len(self.grants)]
            if step.of == "own":
                customer = owner
            elif customer == owner:
                customer = self.customers[(step.customer + 1) % CUSTOMERS]
        return void(customer, f"v{index}", target)

    def resend(self, step: ResendStep) -> Event | None:
        if not self.sent:
            return None
        event = dict(self.sent[step.index % len(self.sent)])
        if step.change:
            if "tokens" in event:
                event["tokens"] += 1
            else:
                event["reason"] = "changed"
        if step.reorder:
            event = dict(reversed(list(event.items())))
        return event


async def run_plan(harness: Harness, plan: Plan) -> None:
    run = harness.new_run(plan.partitions)
    producer = Producer(run)
    pending: list[Event] = []
    waited = 0
    for index, (step, end) in enumerate(plan.steps):
        if isinstance(step, Skip):
            continue
        if isinstance(step, WaitStep):
            if pending:
                await run.batch(pending)
                pending = []
            if waited + step.ms <= MAX_WAIT_MS:
                await asyncio.sleep(step.ms / 1000)
                waited += step.ms
            continue
        event = producer.event(step, index)
        if event is not None:
            pending.append(event)
        if end != "no" and pending:
            await run.batch(pending, path="own" if end == "own" else "auto")
            pending = []
    if pending:
        await run.batch(pending)


# --- strategies --------------------------------------------------------------------------------

# Most events for one customer, so that its grants, usage and voids interact.
customers = st.sampled_from([0, 0, 0, 1, 2])
grant_steps = st.builds(
    GrantStep,
    customer=customers,
    tokens=st.integers(20, 200),
    # Skewed towards equal expiry and priority, so that the later tie-breaks get their turn.
    priority=st.sampled_from([0, 0, 0, 1, 2, 3]),
    cost_basis=st.sampled_from(["0", "0.0001", "0.001"]),
    expiry=st.sampled_from(["none", "none", "none", "past", "near", "far"]),
    start=st.sampled_from(["default", "default", "default", "default", "past", "near", "far"]),
    expiry_ms=st.integers(0, 900),
    start_ms=st.integers(0, 600),
)
# Mostly less than a grant, now and then more than a balance holds (overage).
usage_tokens = st.sampled_from([(1, 40)] * 5 + [(100, 300)]).flatmap(
    lambda bounds: st.integers(*bounds)
)
usage_steps = st.builds(UsageStep, customer=customers, tokens=usage_tokens)
void_steps = st.builds(
    VoidStep,
    customer=customers,
    target=st.integers(0, 20),
    of=st.sampled_from(["own", "own", "other", "unknown"]),
)
resend_steps = st.builds(
    ResendStep, index=st.integers(0, 30), change=st.booleans(), reorder=st.booleans()
)
wait_steps = st.builds(WaitStep, ms=st.integers(50, 400))
# Weighted: grants and usage make most of the traffic.
STEP_MIX: list[st.SearchStrategy[Step]] = [
    st.just(Skip()),  # first: shrinking goes towards it
    *[grant_steps] * 4,
    *[usage_steps] * 4,
    *[void_steps] * 2,
    *[resend_steps] * 2,
    *[wait_steps] * 2,
]
steps: st.SearchStrategy[Step] = st.sampled_from(STEP_MIX).flatmap(lambda strategy: strategy)
batch_ends: st.SearchStrategy[BatchEnd] = st.sampled_from(["no", "no", "no", "worker", "own"])
plans = st.builds(
    Plan,
    partitions=st.tuples(st.integers(0, 1), st.integers(0, 1), st.integers(0, 1)),
    steps=st.lists(st.tuples(steps, batch_ends), min_size=10, max_size=40).map(tuple),
)

# The bug report's sequence: a void of the grant that paid must not touch the other one.
BUG_REPORT_STEPS: tuple[Step, ...] = (
    GrantStep(0, 100, priority=3, cost_basis="0.0001"),
    GrantStep(0, 100, priority=0, cost_basis="0"),
    UsageStep(0, 50),
    VoidStep(0, target=1, of="own"),
)


# --- tests -------------------------------------------------------------------------------------


def test_ledger_agrees_with_its_model(settings: Settings) -> None:
    # Synchronous, with a loop of its own: hypothesis runs each example as a plain call.
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        opened = Harness.open(settings)
        harness = runner.run(opened.__aenter__())
        try:

            @hypothesis_settings(
                max_examples=EXAMPLES,
                derandomize=True,
                database=None,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            )
            @given(plan=plans)
            @example(Plan((0, 1, 0), tuple((step, "worker") for step in BUG_REPORT_STEPS)))
            @example(Plan((0, 1, 0), tuple((step, "no") for step in BUG_REPORT_STEPS)))
            def check(plan: Plan) -> None:
                runner.run(run_plan(harness, plan))

            check()
            runner.run(assert_invariants(settings))
        finally:
            runner.run(opened.__aexit__(None, None, None))


async def assert_void_of_the_paying_grant(settings: Settings, *, one_batch: bool) -> None:
    """The bug report: customer x, grants g-old and g-new, usage 50 (g-new pays, being
    priority 0 and free), then a void of g-new: balance 100, g-old untouched."""
    async with Harness.open(settings) as harness:
        run = harness.new_run()
        x = run.customers[0]
        events = [
            grant(x, "g-old", 100, cost_basis="0.0001", priority=3),
            grant(x, "g-new", 100, cost_basis="0", priority=0),
            usage(x, "u-1", 50),
            void(x, "v-1", "g-new"),
        ]
        if one_batch:
            await run.batch(events, path="worker")
        else:
            for event in events:
                await run.batch([event], path="worker")
        async with harness.pool.acquire() as conn:
            state = await database_state(conn, settings, [x])
    assert state["balances"][x] == (100, 0, 100)
    assert state["grants"] == {(x, "g-old"): (100, "active"), (x, "g-new"): (0, "voided")}
    assert state["payments"][x] == [("u-1", "g-new", 50)]
    assert state["alerts"][x] == [("credit_balance_recovered", 0, 100, "credit_grant", "g-old")]


async def test_void_of_the_grant_that_paid_leaves_the_other_untouched(settings: Settings) -> None:
    await assert_void_of_the_paying_grant(settings, one_batch=False)


async def test_void_of_the_grant_that_paid_in_one_batch(settings: Settings) -> None:
    await assert_void_of_the_paying_grant(settings, one_batch=True)


async def test_grant_expired_before_it_arrives_is_credited_and_expired(settings: Settings) -> None:
    """A grant whose expires_at is yesterday (no effective_at) goes through the worker's
    path: credited and expired at once, without alerts, and the partition goes on."""
    async with Harness.open(settings) as harness:
        run = harness.new_run()
        x = run.customers[0]
        yesterday = rfc3339(datetime.now(UTC) - timedelta(days=1))
        await run.batch([grant(x, "g-stale", 100, expires_at=yesterday)], path="worker")
        async with harness.pool.acquire() as conn:
            state = await database_state(conn, settings, [x])
            amounts = await conn.fetch(
                "SELECT amount FROM ledger_entries WHERE customer_ref = $1 ORDER BY seq", x
            )
        assert state["balances"][x] == (0, 0, 0)
        assert [r["amount"] for r in amounts] == [100, -100]
        assert state["grants"] == {(x, "g-stale"): (0, "expired")}
        # One event, judged once: 0 before the credit, 0 after the expiry, no alert (not a
        # recovered-then-depleted pair for tokens the customer never held).
        assert state["alerts"].get(x, []) == []
        assert state["dead_letters"] == {}
        # Not stalled: what follows, in the same batch and the next, is applied.
        stale = grant(x, "g-stale-2", 10, expires_at=yesterday)
        await run.batch([stale, usage(x, "u-1", 5)], path="worker")
        await run.batch([grant(x, "g-fresh", 20), usage(x, "u-2", 5)], path="worker")
        async with harness.pool.acquire() as conn:
            state = await database_state(conn, settings, [x])
        assert state["balances"][x] == (10, 0, 10)
        assert state["dead_letters"] == {}
