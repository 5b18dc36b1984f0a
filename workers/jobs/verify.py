"""``chargeline verify``: the invariants of SPEC.md section 9, checked against Postgres.

Each check is one set-based query returning the rows that break it (the first few, with
a count), so it stays fast on a database with millions of events. The result is also a
metric (``chargeline_verify_violations{invariant}``), set by the verify worker, so ops can
alert on drift.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from workers import db
from workers.db import Connection, Pool
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
class Report:
    violations: list[Violation] = field(default_factory=list)
    checks: int = 0
    seconds: float = 0.0

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
        }


async def verify(conn: Connection, *, limit: int = SHOWN_ROWS) -> Report:
    """Run every check in one repeatable-read snapshot, so checks agree with each other."""
    report = Report()
    started = time.monotonic()
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        for invariant, check, query, description in CHECKS:
            rows = await conn.fetch(db.QUERIES[query], limit)
            report.checks += 1
            if rows:
                report.violations.append(
                    Violation(invariant, check, description, [dict(r.items()) for r in rows])
                )
    report.seconds = time.monotonic() - started
    return report


def export(report: Report, metrics: Metrics) -> None:
    for invariant, count in report.by_invariant().items():
        metrics.verify_violations.labels(invariant=str(invariant)).set(count)
    metrics.verify_last_run.set(time.time())


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
        report = await self.retry(self._once)
        export(report, self.metrics)
        if report.ok:
            log.info("verify_passed", checks=report.checks, seconds=round(report.seconds, 3))
        else:
            log.error(
                "verify_failed",
                violations={v.check: len(v.rows) for v in report.violations},
            )
        return False

    async def _once(self) -> Report:
        async with self.pool.acquire() as conn:
            return await verify(conn)
