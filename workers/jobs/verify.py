"""``chargeline verify``: the invariants of SPEC.md section 9, checked against Postgres.

Each check is one set-based query returning the rows that break it (the first few, with
a count). A run checks what came after the last passing run's checkpoint, against the
state that run recorded (``verify_recent.sql``), so its cost follows the traffic since,
not all history; ``full`` checks everything (``verify.sql``) and leaves the checkpoint
alone. The result is also a metric (``chargeline_verify_violations{invariant}``), set by
the verify worker, so ops can alert on drift.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from workers import db
from workers.db import Connection, Pool
from workers.errors import ChargelineError
from workers.lifecycle import PeriodicWorker
from workers.logs import get_logger
from workers.metrics import Metrics
from workers.settings import Settings

log = get_logger("chargeline.verify")

# (invariant number, check name, query, what it means)
CHECKS: list[tuple[int, str, str, str]] = [
    (1, "duplicate_keys", "verify_duplicate_keys", "a dedup key applied more than once"),
    (1, "usage_applied_once", "verify_usage_applied_once",
     "a usage event not in the ledger exactly once"),
    (1, "conflicts_recorded", "verify_conflicts_recorded",
     "a reference_conflict dead letter without its conflict row"),
    (2, "balances", "verify_balances",
     "balance differs from the ledger sum or from grants remaining - overage"),
    (2, "grants", "verify_grants", "a grant's tokens left differ from its ledger entries"),
    (2, "ledger_sequence", "verify_ledger_sequence",
     "ledger entries out of sequence, or balance_after not a running sum"),
    (2, "consumption_order", "verify_consumption_order",
     "a usage paid by a grant while a grant earlier in consumption order had tokens left"),
    (2, "ledger_references", "verify_ledger_references",
     "a ledger entry whose grant, usage event or void does not exist"),
    (3, "charge_flows", "verify_charge_flows", "a charge whose flow does not exist"),
    (3, "payouts", "verify_payouts",
     "a payout whose count or total differs from its charges, or a charge in no real payout"),
    (4, "alerts", "verify_alerts",
     "an alert that is no balance crossing, or depleted/recovered not alternating"),
    (4, "alerts_in_outbox", "verify_alerts_in_outbox", "an alert not in the outbox exactly once"),
    (5, "dead_letters", "verify_dead_letters",
     "a dead letter recorded twice, without its position, or not sent to billing.dlq"),
]  # fmt: skip
INVARIANTS = (1, 2, 3, 4, 5)
SHOWN_ROWS = 20

# One run at a time: each starts from the checkpoint the last one wrote.
_VERIFY_LOCK_ID = 0x76657269  # "veri"
# The fence's SHARE lock waits for the writers in flight, and every new writer of those
# tables queues behind it for as long as it waits: each attempt stalls ingestion by up to
# its timeout. So it first waits briefly, which is enough when the writers in flight are
# lane transactions; only the last attempts wait past deadlock_timeout (1 s), so that an
# autovacuum of one of the tables, which would otherwise hold verify off for as long as it
# runs, is cancelled for it as for any lock request. Attempts are a second apart; after the
# last the run is given up (the verify worker tries again at its next interval).
FENCE_LOCK_TIMEOUTS_MS = (200,) * 8 + (2000,) * 2
FENCE_PAUSE_S = 1.0
FENCED_TABLES = "usage_events, charges, dead_letters, outbox"


class FenceUnavailable(ChargelineError):
    """The writers of the numbered tables never paused long enough to fence them."""


@dataclass
class Violation:
    invariant: int
    check: str
    description: str
    rows: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "invariant": self.invariant,
            "check": self.check,
            "description": self.description,
            "rows": self.rows,
        }


@dataclass
class Scope:
    """What a run since the checkpoint covered."""

    since: Any  # the checkpoint's time; None on a first run, which checks everything
    entries: int
    customers: int

    def as_dict(self) -> dict[str, Any]:
        return {"since": self.since, "entries": self.entries, "customers": self.customers}


@dataclass
class Report:
    violations: list[Violation] = field(default_factory=list)
    checks: int = 0
    seconds: float = 0.0
    scope: Scope | None = None  # None: a full run
    # Where the time went: each check, and a run since the checkpoint's other steps.
    step_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    def by_invariant(self) -> dict[int, int]:
        counts = dict.fromkeys(INVARIANTS, 0)
        for violation in self.violations:
            counts[violation.invariant] += len(violation.rows)
        return counts

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "violations": [v.as_dict() for v in self.violations],
            "checks": self.checks,
            "seconds": round(self.seconds, 3),
            "step_seconds": {step: round(s, 3) for step, s in self.step_seconds.items()},
            "mode": "full" if self.scope is None else "recent",
            "scope": None if self.scope is None else self.scope.as_dict(),
        }


async def verify(conn: Connection, *, limit: int = SHOWN_ROWS) -> Report:
    """Every check on all history, in one repeatable-read snapshot, so checks agree with
    each other. Reads only."""
    report = Report()
    started = time.monotonic()
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await _run_checks(conn, report, limit, recent=False)
    report.seconds = time.monotonic() - started
    return report


async def verify_recent(conn: Connection, fence: Connection, *, limit: int = SHOWN_ROWS) -> Report:
    """Every check on what came after the checkpoint, then, if all pass, the checkpoint
    moved to this run's snapshot. ``fence`` is a second connection, held only while the
    snapshot is taken. The first run (no checkpoint) checks everything."""
    report = Report()
    started = time.monotonic()
    await conn.execute("SELECT pg_advisory_lock($1)", _VERIFY_LOCK_ID)
    try:
        transaction, numbers = await _fenced_snapshot(conn, fence)
        try:
            fenced = time.monotonic()
            report.step_seconds["fence"] = fenced - started
            report.scope = await _window(conn)
            report.step_seconds["window"] = time.monotonic() - fenced
            await _run_checks(conn, report, limit, recent=True)
            if report.ok:
                moved = time.monotonic()
                await conn.execute(db.QUERIES["verify_recent_advance"])
                await conn.execute(db.QUERIES["verify_recent_advance_numbers"], *numbers)
                report.step_seconds["advance"] = time.monotonic() - moved
            await transaction.commit()
        except BaseException:
            await transaction.rollback()
            raise
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _VERIFY_LOCK_ID)
    report.seconds = time.monotonic() - started
    return report


async def _window(conn: Connection) -> Scope:
    """The temporary tables the checks read: what moved since the checkpoint."""
    since = await conn.fetchrow(db.QUERIES["verify_recent_from"])
    assert since is not None
    # Each statement planned for the numbers it is given, never as a generic plan that
    # would guess a third of a table is "after the checkpoint".
    await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
    await conn.execute(db.QUERIES["verify_recent_window"])
    for table, number in (
        ("usage", "usage_id"),
        ("charges", "charge_id"),
        ("dead_letters", "dead_letter_id"),
        ("outbox", "outbox_id"),
    ):
        await conn.execute(db.QUERIES[f"verify_recent_new_{table}"], since[number])
    await conn.execute(db.QUERIES["verify_recent_analyze"])
    scope = await conn.fetchrow(db.QUERIES["verify_recent_scope"])
    assert scope is not None
    return Scope(since["checked_at"], scope["entries"], scope["customers"])


async def _fenced_snapshot(
    conn: Connection, fence: Connection
) -> tuple[db.Transaction, tuple[int, int, int, int]]:
    """A repeatable-read transaction on ``conn`` whose snapshot was taken while no writer of
    the numbered tables was in flight, with the last numbers handed out then: every row
    numbered up to them is in the snapshot or never will be. The lock is held for as long
    as taking the snapshot lasts, not for the checks."""
    for attempt, timeout_ms in enumerate(FENCE_LOCK_TIMEOUTS_MS, start=1):
        try:
            async with fence.transaction(isolation="repeatable_read"):
                await fence.execute(f"SET LOCAL lock_timeout = {timeout_ms}")
                await fence.execute(f"LOCK TABLE {FENCED_TABLES} IN SHARE MODE")
                cut = await fence.fetchrow(db.QUERIES["verify_fence"])
                assert cut is not None
                transaction = conn.transaction(isolation="repeatable_read")
                await transaction.start()
                try:
                    # The id is Postgres's own (hex digits and dashes); SET takes no parameter.
                    await conn.execute(f"SET TRANSACTION SNAPSHOT '{cut['snapshot']}'")
                except BaseException:
                    await transaction.rollback()
                    raise
        except asyncpg.LockNotAvailableError:
            holders = await fence.fetch(db.QUERIES["verify_fence_holders"])
            log.info(
                "verify_fence_busy",
                attempt=attempt,
                waited_ms=timeout_ms,
                holders=[dict(row.items()) for row in holders],
            )
            await asyncio.sleep(FENCE_PAUSE_S)
        else:
            numbers = (cut["usage_id"], cut["charge_id"], cut["dead_letter_id"], cut["outbox_id"])
            return transaction, numbers
    raise FenceUnavailable(
        f"verify could not take its snapshot: {FENCED_TABLES} were never free of writers"
        f" in {len(FENCE_LOCK_TIMEOUTS_MS)} attempts a second apart"
        " (a long transaction writing them?); try again, or run --full, which needs no lock"
    )


async def _run_checks(conn: Connection, report: Report, limit: int, *, recent: bool) -> None:
    for invariant, check, query, description in CHECKS:
        started = time.monotonic()
        rows = await conn.fetch(db.QUERIES[f"verify_recent_{check}" if recent else query], limit)
        report.step_seconds[check] = time.monotonic() - started
        report.checks += 1
        if rows:
            report.violations.append(
                Violation(invariant, check, description, [dict(r.items()) for r in rows])
            )


def export(report: Report, metrics: Metrics) -> None:
    for invariant, count in report.by_invariant().items():
        metrics.verify_violations.labels(invariant=str(invariant)).set(count)
    metrics.verify_last_run.set(time.time())
    metrics.verify_duration.set(report.seconds)
    if report.scope is not None:
        metrics.verify_entries.set(report.scope.entries)


class VerifyWorker(PeriodicWorker):
    """Runs ``verify`` every ``verify_interval_s`` and exports the result as metrics."""

    name = "verify"

    def __init__(self, settings: Settings, pool: Pool, metrics: Metrics) -> None:
        super().__init__(settings, metrics)
        self.pool = pool

    @property
    def interval_s(self) -> float:
        return self.settings.verify_interval_s

    async def tick(self) -> bool:
        try:
            report = await self.retry(self._once)
        except FenceUnavailable as busy:
            # The books are not in doubt, only unchecked this round: the metric of the last
            # run stands, and ChargelineVerifyNotRunning fires if this goes on.
            log.warning("verify_skipped", reason=str(busy))
            return False
        export(report, self.metrics)
        if report.ok:
            log.info(
                "verify_passed",
                checks=report.checks,
                seconds=round(report.seconds, 3),
                entries=report.scope.entries if report.scope else None,
                customers=report.scope.customers if report.scope else None,
            )
        else:
            log.error(
                "verify_failed",
                violations={v.check: len(v.rows) for v in report.violations},
            )
        return False

    async def _once(self) -> Report:
        async with self.pool.acquire() as conn, self.pool.acquire() as fence:
            return await verify_recent(conn, fence)
