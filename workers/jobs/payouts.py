"""Payouts: close periods into payouts, publish them, and pay Stripe payees (SPEC.md section 7).

A *cut* at time T gathers, per payee and currency, every charge not yet paid out whose
``recorded_at`` is before T into one payout, in one transaction with one statement (so a
payout and the charges it claims come from one snapshot), and writes a ``billing.payouts``
outbox row for each payout in the same transaction. Cuts are serialised by a
transaction-level advisory lock and only move forward, so a closed period never changes.
A charge whose transaction commits after a cut, with ``recorded_at`` before it, is still
unpaid at the next cut and goes into that payout: no charge is left behind.

The worker closes periods (hourly or daily, UTC) ``payout_grace_s`` after they end, one cut
per period that holds unpaid charges, oldest first. ``chargeline payouts run`` cuts at any
past time on demand.

Stripe payees are paid by a sender, outside the cut's transaction: it records the attempt
(committed) before calling Stripe, creates the Stripe Payout with the payout id as
idempotency key and in its metadata, and marks the payout ``sent`` or ``failed``. An attempt
that may have reached Stripe (a crash, a lost response) is never repeated blindly: the next
attempt first looks for a Stripe Payout carrying the payout id, so each payout is created at
most once even where Stripe's idempotency keys do not help (expired after 24 hours; ignored
by the local stand-in).

An operator finishes a failed payout (``chargeline payouts retry|cancel``): ``retry_payout``
puts it back to ``pending`` and sends it at once through ``send_one``, so the same rules hold
(its earlier attempts make the send look the Stripe Payout up first); ``cancel_payout``
cancels it and releases its charges, in one transaction, for the next cut. Both take the
senders' lock, so neither runs while a sender has the payout with Stripe.

Every status change (sent, failed, pending again, cancelled) writes a ``billing.payouts``
outbox row in its own transaction, as the cut does for a new payout: the same ``PayoutEvent``
with the new status, keyed by payee, with the payout's revision in a header.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

import stripe
from stripe.params import PayoutCreateParams, PayoutListParams

from schemas.outputs import HEADER_PAYOUT_REVISION, PayoutEvent
from workers import db, stripe_gateway
from workers.db import Connection, Pool, fetch_one
from workers.errors import ChargelineError, NotFoundError, UsageError
from workers.kafka import encode_headers
from workers.lifecycle import PeriodicWorker
from workers.logs import get_logger
from workers.metrics import Metrics
from workers.retry import Stopping, retry_transient
from workers.settings import Settings
from workers.stripe_gateway import StripeGateway

log = get_logger("chargeline.payouts")
T = TypeVar("T")

PayoutPeriod = Literal["hourly", "daily"]
CutTrigger = Literal["scheduled", "manual"]

_CUT_LOCK_ID = 0x7061796F757473  # "payouts"
_SEND_LOCK_ID = 0x737472697065  # "stripe"
_DATE_TRUNC: dict[str, str] = {"hourly": "hour", "daily": "day"}
_SEND_PAGE = 100
_STRIPE_SEND_ATTEMPTS = 5  # per worker tick; the next tick tries again
_LOOKUP_PAGE = 100
_LOOKUP_MAX_PAGES = 100
_OPERATOR_STRIPE_ATTEMPTS = 5  # `payouts retry|cancel`: Stripe outages retried this often
_SEND_TURN_WAIT_S = 30.0  # `payouts retry|cancel` wait this long for the senders' lock
_SEND_TURN_POLL_S = 0.05
CUT_REVISION = 1  # the revision of a payout's first billing.payouts record, the cut's
METADATA_PAYOUT_ID = "chargeline_payout_id"
METADATA_PAYEE = "chargeline_payee_ref"


class CutInFuture(UsageError):
    """A payout cut cannot be in the future."""


class PeriodClosed(ChargelineError):
    """Payouts are already closed up to a later time."""


class PayoutMismatch(ChargelineError):
    """A payout's totals differ from the charges it claimed; the cut was rolled back."""


class StripeLookupIncomplete(ChargelineError):
    """Could not tell whether Stripe already holds this payout; it stays pending."""


class PayoutNotRetryable(UsageError):
    """Only a failed payout can be retried."""


class PayoutNotCancellable(UsageError):
    """Only a failed payout, or a pending one never attempted, can be cancelled."""


class PayoutAtStripe(ChargelineError):
    """Stripe holds a Payout for this payout: it was paid, and is not cancelled."""


class PayoutLeftPending(ChargelineError):
    """The payout is pending again but was not sent; the senders will send it."""


class SendersBusy(ChargelineError):
    """A sender kept the Stripe payouts lock too long; nothing was changed."""


# --- periods (pure) ---


def period_length(period: PayoutPeriod) -> timedelta:
    return timedelta(hours=1) if period == "hourly" else timedelta(days=1)


def period_floor(moment: datetime, period: PayoutPeriod) -> datetime:
    """Start (UTC) of the period that contains ``moment``."""
    utc = moment.astimezone(UTC)
    if period == "hourly":
        return utc.replace(minute=0, second=0, microsecond=0)
    return utc.replace(hour=0, minute=0, second=0, microsecond=0)


def next_scheduled_cut(
    *,
    now: datetime,
    last_end: datetime | None,
    earliest_unpaid: datetime | None,
    period: PayoutPeriod,
    grace_s: float,
) -> datetime | None:
    """The period boundary to cut at now, or None when no period with unpaid charges is due.

    The first boundary after the earliest unpaid charge and after the last cut (which may be
    a manual cut between boundaries), if it ended at least ``grace_s`` ago. Periods without
    unpaid charges are skipped; called again after each cut, this closes missed periods one
    by one, oldest first.
    """
    if earliest_unpaid is None:
        return None
    step = period_length(period)
    candidate = period_floor(earliest_unpaid, period) + step
    if last_end is not None:
        candidate = max(candidate, period_floor(last_end, period) + step)
    due = period_floor(now - timedelta(seconds=grace_s), period)
    return candidate if candidate <= due else None


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


# --- cuts ---


@dataclass(frozen=True)
class Cut:
    """The outcome of one cut: the payouts it created (none when nothing was due)."""

    period_end: datetime
    trigger: CutTrigger
    payouts: list[dict[str, Any]] = field(default_factory=list)
    already_cut: bool = False  # a manual cut at exactly the last cut's time: nothing to do


async def cut_payouts(
    conn: Connection, *, until: datetime | None, period: PayoutPeriod, topic: str
) -> Cut:
    """Cut payouts at ``until`` (the database's current time when None), on demand.

    A time in the future is refused (``CutInFuture``), one before the last cut too
    (``PeriodClosed``: that period is closed); the last cut's own time is a no-op.
    """
    async with conn.transaction():
        await conn.execute(db.QUERIES["payout_cut_lock"], _CUT_LOCK_ID)
        state = await fetch_one(conn, db.QUERIES["payout_cut_state"])
        now, last_end = state["now"], state["last_end"]
        end = now if until is None else until
        if end > now:
            raise CutInFuture(f"--until {rfc3339(end)} is in the future (now {rfc3339(now)})")
        if last_end is not None and end <= last_end:
            if end == last_end:
                return Cut(end, "manual", already_cut=True)
            raise PeriodClosed(f"payouts are closed up to {rfc3339(last_end)}; cut at a later time")
        return await _cut_at(conn, end, "manual", period=period, topic=topic)


async def cut_scheduled(
    conn: Connection, *, period: PayoutPeriod, grace_s: float, topic: str
) -> Cut | None:
    """Close the oldest due period that holds unpaid charges; None when none is due."""
    async with conn.transaction():
        await conn.execute(db.QUERIES["payout_cut_lock"], _CUT_LOCK_ID)
        state = await fetch_one(conn, db.QUERIES["payout_cut_state"])
        end = next_scheduled_cut(
            now=state["now"],
            last_end=state["last_end"],
            earliest_unpaid=state["earliest_unpaid"],
            period=period,
            grace_s=grace_s,
        )
        if end is None:
            return None
        return await _cut_at(conn, end, "scheduled", period=period, topic=topic)


async def _cut_at(
    conn: Connection, end: datetime, trigger: CutTrigger, *, period: PayoutPeriod, topic: str
) -> Cut:
    """Inside the cut's transaction, holding the lock: 1. the cut row, 2. payouts and the
    charges they claim (one statement), 3. their outbox rows."""
    cut_id = await conn.fetchval(db.QUERIES["payout_cut_insert"], end, trigger)
    rows = await conn.fetch(db.QUERIES["payout_cut"], end, cut_id, _DATE_TRUNC[period])
    payouts: list[dict[str, Any]] = []
    for row in rows:
        payout = dict(row.items())
        claimed = (payout.pop("claimed_count"), payout.pop("claimed_amount"))
        if claimed != (payout["charge_count"], payout["amount"]):
            raise PayoutMismatch(
                f"payout {payout['payout_id']}: {payout['charge_count']} charges, "
                f"{payout['amount']} in total, but {claimed[0]} claimed for {claimed[1]}"
            )
        payouts.append(payout)
    if payouts:
        await publish(conn, payouts, [CUT_REVISION] * len(payouts), topic=topic)
    await conn.execute(db.QUERIES["payout_cut_done"], cut_id, len(payouts))
    return Cut(end, trigger, payouts)


async def publish(
    conn: Connection,
    payouts: Sequence[Mapping[str, Any]],
    revisions: Sequence[int],
    *,
    topic: str,
) -> None:
    """The ``billing.payouts`` outbox rows of ``payouts`` as they now stand, in the caller's
    transaction: keyed by payee, the revision in a header."""
    await conn.execute(
        db.QUERIES["payout_outbox"],
        [p["payee_ref"] for p in payouts],
        [payout_event(p).model_dump_json().encode() for p in payouts],
        [encode_headers([(HEADER_PAYOUT_REVISION, str(r).encode())]) for r in revisions],
        topic,
    )


async def change_status(
    conn: Connection, query: str, *args: Any, topic: str
) -> dict[str, Any] | None:
    """One status change and its ``billing.payouts`` record, in one transaction. ``query``
    changes the payout and returns it as it now stands, with its revision; None (nothing
    written) when the payout was not in the state ``query`` expects."""
    async with conn.transaction():
        row = await conn.fetchrow(db.QUERIES[query], *args)
        if row is None:
            return None
        payout = dict(row.items())
        await publish(conn, [payout], [payout["revision"]], topic=topic)
    return payout


def payout_event(payout: Mapping[str, Any]) -> PayoutEvent:
    return PayoutEvent(
        payout_id=payout["payout_id"],
        payee_ref=payout["payee_ref"],
        currency=payout["currency"],
        period_start=payout["period_start"],
        period_end=payout["period_end"],
        charge_count=payout["charge_count"],
        amount=payout["amount"],
        status=payout["status"],
        created_at=payout["created_at"],
    )


# --- Stripe ---


def stripe_is_transient(exc: BaseException) -> bool:
    """Sending a payout talks to Stripe and Postgres: an outage of either is retried."""
    return stripe_gateway.is_transient(exc) or db.is_transient(exc)


# Stripe refused this payout: it is marked failed with Stripe's code and message. Other
# permanent errors (a wrong API key) are not the payout's fault: it stays pending.
_REFUSALS = (
    stripe.InvalidRequestError,
    stripe.CardError,
    stripe.PermissionError,
    stripe.IdempotencyError,
)


class StripePayouts:
    """Creates one Stripe Payout per pending payout, never two."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        # The SDK does not retry (max_network_retries=0): our retries look the payout up
        # before they could create it again.
        self.gateway = StripeGateway(settings, metrics)
        self.topic = settings.topic_payouts

    async def close(self) -> None:
        await self.gateway.close()

    async def send_pending(self, pool: Pool) -> Counter[str]:
        """Send every pending payout, oldest first; outcomes counted (sent, failed, skipped).

        One sender at a time (a session advisory lock); another sender's turn returns at once.
        """
        outcomes: Counter[str] = Counter()
        async with pool.acquire() as conn:
            if not await conn.fetchval(db.QUERIES["payout_send_try_lock"], _SEND_LOCK_ID):
                return outcomes
            try:
                while True:
                    rows = await conn.fetch(db.QUERIES["payouts_to_send"], _SEND_PAGE)
                    for row in rows:
                        outcomes[await self.send_one(conn, dict(row.items()))] += 1
                    if len(rows) < _SEND_PAGE:
                        return outcomes
            finally:
                if not conn.is_closed():
                    await conn.execute(db.QUERIES["payout_send_unlock"], _SEND_LOCK_ID)

    async def send_one(self, conn: Connection, payout: dict[str, Any]) -> str:
        """1. record the attempt, 2. find or create the Stripe Payout, 3. mark it (with its
        ``billing.payouts`` record, in one transaction)."""
        payout_id = payout["payout_id"]
        earlier = await self.start_attempt(conn, payout_id)
        if earlier is None:
            return "skipped"  # no longer pending
        try:
            sent = await self.submit(payout, earlier_attempts=earlier)
        except _REFUSALS as exc:
            code = exc.code or (exc.error.type if exc.error else None) or type(exc).__name__
            message = exc.user_message or str(exc)
            await change_status(
                conn, "payout_mark_failed", payout_id, code, message, topic=self.topic
            )
            log.warning(
                "stripe_payout_failed", payout_id=payout_id, stripe_code=code, detail=message
            )
            return "failed"
        await change_status(conn, "payout_mark_sent", payout_id, sent.id, topic=self.topic)
        log.info("stripe_payout_sent", payout_id=payout_id, stripe_payout_id=sent.id)
        return "sent"

    async def start_attempt(self, conn: Connection, payout_id: str) -> int | None:
        """Record an attempt (committed); the number of earlier ones, None if not pending."""
        earlier: int | None = await conn.fetchval(db.QUERIES["payout_send_attempt"], payout_id)
        return earlier

    async def submit(self, payout: dict[str, Any], *, earlier_attempts: int) -> stripe.Payout:
        """The Stripe Payout of ``payout``: the one an earlier attempt created, or a new one."""
        if earlier_attempts > 0:
            found = await self.find(payout)
            if found is not None:
                log.info("stripe_payout_found", payout_id=payout["payout_id"], id=found.id)
                return found
        params: PayoutCreateParams = {
            "amount": payout["amount"],
            "currency": payout["currency"].lower(),
            "description": f"chargeline payout {payout['payout_id']}",
            "metadata": {
                METADATA_PAYOUT_ID: payout["payout_id"],
                METADATA_PAYEE: payout["payee_ref"],
            },
        }
        return await self.gateway.create_payout(
            params, idempotency_key=payout["payout_id"], account=payout["stripe_account"]
        )

    async def find(self, payout: dict[str, Any]) -> stripe.Payout | None:
        """The Stripe Payout carrying this payout's id (and amount and currency), if any."""
        params: PayoutListParams = {"limit": _LOOKUP_PAGE}
        for _ in range(_LOOKUP_MAX_PAGES):
            page = await self.gateway.list_payouts(params, account=payout["stripe_account"])
            for item in page.data:
                metadata = item.metadata.to_dict() if item.metadata is not None else {}
                if (
                    metadata.get(METADATA_PAYOUT_ID) == payout["payout_id"]
                    and item.amount == payout["amount"]
                    and item.currency == payout["currency"].lower()
                ):
                    return item
            if not page.has_more or not page.data:
                return None
            params = {"limit": _LOOKUP_PAGE, "starting_after": page.data[-1].id}
        raise StripeLookupIncomplete(
            f"payout {payout['payout_id']}: not among the last "
            f"{_LOOKUP_PAGE * _LOOKUP_MAX_PAGES} Stripe payouts; left pending"
        )


# --- an operator finishes a payout ---


@asynccontextmanager
async def senders_turn(
    conn: Connection, *, wait_s: float = _SEND_TURN_WAIT_S
) -> AsyncIterator[None]:
    """The senders' lock (session-level, as ``send_pending`` takes it), waited for: while it
    is held, no sender has a payout with Stripe, nor starts one."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while not await conn.fetchval(db.QUERIES["payout_send_try_lock"], _SEND_LOCK_ID):
        if loop.time() >= deadline:
            raise SendersBusy(
                f"a Stripe payout sender (the payouts worker, `payouts send`) held the send "
                f"lock for over {wait_s:g} s; nothing changed, try again"
            )
        await asyncio.sleep(_SEND_TURN_POLL_S)
    try:
        yield
    finally:
        if not conn.is_closed():
            await conn.execute(db.QUERIES["payout_send_unlock"], _SEND_LOCK_ID)


async def stored_payout(conn: Connection, payout_id: str) -> dict[str, Any]:
    """The payout as ``payouts show`` reads it; ``NotFoundError`` when there is none."""
    row = await conn.fetchrow(db.QUERIES["payout_show"], payout_id)
    if row is None:
        raise NotFoundError(f"no payout {payout_id!r}")
    return dict(row.items())


def _why_not_retried(payout: Mapping[str, Any]) -> str:
    status, payout_id = payout["status"], payout["payout_id"]
    because = {
        "pending": "the senders have it (the payouts worker; `chargeline payouts send` now)",
        "sent": f"Stripe has it as {payout['stripe_payout_id']}",
        "recorded": "its payee is paid outside chargeline, not through Stripe",
        "cancelled": "its charges went back to be paid out again",
    }.get(status, "")
    return f"payout {payout_id!r} is {status}, not failed: {because}; nothing retried"


def _why_not_cancelled(payout: Mapping[str, Any]) -> str:
    status, payout_id = payout["status"], payout["payout_id"]
    because = {
        "pending": (
            f"{payout['stripe_attempts']} Stripe attempt(s) started, so Stripe may hold it; "
            "wait for the senders to mark it sent or failed"
        ),
        "sent": f"Stripe has it as {payout['stripe_payout_id']}",
        "recorded": "its payee is paid outside chargeline, which cannot tell whether it was",
        "cancelled": "already cancelled",
    }.get(status, "")
    return f"payout {payout_id!r} is {status}: {because}; nothing cancelled"


def cancellable(payout: Mapping[str, Any]) -> bool:
    """Failed, or pending with no Stripe attempt ever started (none can exist at Stripe)."""
    status: str = payout["status"]
    attempts: int = payout["stripe_attempts"]
    return status == "failed" or (status == "pending" and attempts == 0)


async def retry_payout(
    conn: Connection,
    sender: StripePayouts,
    payout_id: str,
    *,
    settings: Settings,
    metrics: Metrics,
) -> dict[str, Any]:
    """``payouts retry``: a failed payout back to ``pending`` (published), then sent at once
    through ``send_one``; the payout as stored afterwards (``sent`` or ``failed``).

    Its Stripe attempts are kept, so the send looks for a Stripe Payout carrying the id
    before it could create one. Refused, with nothing changed, for a payout that is not
    failed (``PayoutNotRetryable``) or unknown (``NotFoundError``). Should the send not come
    to an end (Stripe unreachable after retries, Postgres gone), the payout stays pending
    for the senders (``PayoutLeftPending``): no attempt is ever lost, so none is repeated
    blindly.
    """
    async with senders_turn(conn):
        reopened = await change_status(conn, "payout_reopen", payout_id, topic=sender.topic)
        if reopened is None:
            raise PayoutNotRetryable(_why_not_retried(await stored_payout(conn, payout_id)))
        try:
            await retry_transient(
                lambda: sender.send_one(conn, reopened),
                is_transient=stripe_gateway.is_transient,
                component="stripe",
                settings=settings,
                metrics=metrics,
                max_attempts=_OPERATOR_STRIPE_ATTEMPTS,
            )
        except Exception as exc:
            if not (
                isinstance(exc, stripe.StripeError | ChargelineError) or stripe_is_transient(exc)
            ):
                raise
            detail = exc.user_message if isinstance(exc, stripe.StripeError) else None
            raise PayoutLeftPending(
                f"payout {payout_id!r} is pending again but was not sent "
                f"({type(exc).__name__}: {detail or exc}); the payouts worker sends it, "
                "or `chargeline payouts send`"
            ) from None
        return await stored_payout(conn, payout_id)


async def cancel_payout(
    conn: Connection,
    sender: StripePayouts,
    payout_id: str,
    *,
    settings: Settings,
    metrics: Metrics,
) -> dict[str, Any]:
    """``payouts cancel``: a failed payout, or a pending one never attempted, ``cancelled``
    and its charges released (``payout_id`` NULL, ``recorded``) in one transaction with its
    ``billing.payouts`` record, so the next cut gathers them again. The payout as cancelled.

    A payout with Stripe attempts is first looked up at Stripe: one Stripe holds was paid,
    and cancelling it would pay its charges twice (``PayoutAtStripe``: retry it instead,
    which records it as sent). Refused, with nothing changed, for any other status
    (``PayoutNotCancellable``) or an unknown id (``NotFoundError``).
    """
    async with senders_turn(conn):
        payout = await stored_payout(conn, payout_id)
        if not cancellable(payout):
            raise PayoutNotCancellable(_why_not_cancelled(payout))
        if payout["stripe_attempts"] > 0:
            found = await retry_transient(
                lambda: sender.find(payout),
                is_transient=stripe_gateway.is_transient,
                component="stripe",
                settings=settings,
                metrics=metrics,
                max_attempts=_OPERATOR_STRIPE_ATTEMPTS,
            )
            if found is not None:
                raise PayoutAtStripe(
                    f"payout {payout_id!r} is {payout['status']} here, but Stripe holds it as "
                    f"{found.id}: run `chargeline payouts retry {payout_id}` to record it as "
                    "sent; nothing cancelled"
                )
        async with conn.transaction():
            cancelled = await change_status(
                conn, "payout_cancel", payout_id, payout["stripe_attempts"], topic=sender.topic
            )
            if cancelled is None:  # changed since it was read (only by hand: we hold the lock)
                raise PayoutNotCancellable(_why_not_cancelled(await stored_payout(conn, payout_id)))
            released = await fetch_one(conn, db.QUERIES["payout_release_charges"], payout_id)
            if (released["charge_count"], released["amount"]) != (
                cancelled["charge_count"],
                cancelled["amount"],
            ):
                raise PayoutMismatch(
                    f"payout {payout_id!r} records {cancelled['charge_count']} charges for "
                    f"{cancelled['amount']}, but {released['charge_count']} name it, for "
                    f"{released['amount']}: see `chargeline verify`; nothing cancelled"
                )
    return cancelled


# --- the worker ---


class PayoutWorker(PeriodicWorker):
    """Closes due periods into payouts, sends Stripe payouts, keeps the backlog gauges."""

    name = "payouts"

    def __init__(self, settings: Settings, pool: Pool, metrics: Metrics) -> None:
        super().__init__(settings, metrics)
        self.pool = pool
        self.stripe = StripePayouts(settings, metrics)
        self.cuts = 0

    @property
    def interval_s(self) -> float:
        return self.settings.payout_interval_s

    async def tick(self) -> bool:
        await self.run_once()
        return False

    async def close(self) -> None:
        await self.stripe.close()
        log.info("payouts_worker_stopped", cuts=self.cuts)

    async def run_once(self) -> list[Cut]:
        """One tick: close due periods, send pending Stripe payouts, refresh the gauges."""
        cuts = await self.retry(self.cut_due)
        await self.send()
        await self.retry(self.refresh_gauges)
        return cuts

    async def cut_due(self) -> list[Cut]:
        """Every due period, oldest first, one cut (one transaction) each."""
        cuts: list[Cut] = []
        async with self.pool.acquire() as conn:
            while not self.stopping.is_set():
                cut = await cut_scheduled(
                    conn,
                    period=self.settings.payout_period,
                    grace_s=self.settings.payout_grace_s,
                    topic=self.settings.topic_payouts,
                )
                if cut is None:
                    break
                self.observe(cut)
                cuts.append(cut)
        return cuts

    def observe(self, cut: Cut) -> None:
        """Count a committed cut's payouts."""
        self.cuts += 1
        for payout in cut.payouts:
            self.metrics.payouts.labels(currency=payout["currency"]).inc()
            self.metrics.payout_amount.labels(currency=payout["currency"]).inc(payout["amount"])
        log.info(
            "payouts_cut",
            period_end=rfc3339(cut.period_end),
            trigger=cut.trigger,
            payouts=len(cut.payouts),
            charges=sum(p["charge_count"] for p in cut.payouts),
        )

    async def send(self) -> Counter[str]:
        """Send pending Stripe payouts. A failure that outlasts the retries, or one that is not
        the payout's fault (a wrong API key), leaves them pending until the next tick."""
        try:
            outcomes = await self.retry(
                lambda: self.stripe.send_pending(self.pool),
                is_transient=stripe_is_transient,
                component="stripe",
                max_attempts=_STRIPE_SEND_ATTEMPTS,
            )
        except Stopping:
            raise
        except Exception as exc:
            if not (
                isinstance(exc, stripe.StripeError | ChargelineError) or stripe_is_transient(exc)
            ):
                raise
            log.error("stripe_payouts_deferred", error=f"{type(exc).__name__}: {exc}")  # noqa: TRY400 -- one line, no traceback: it is retried
            return Counter()
        if outcomes:
            log.info("stripe_payouts_sent", **outcomes)
        return outcomes

    async def refresh_gauges(self) -> None:
        async with self.pool.acquire() as conn:
            row = await fetch_one(conn, db.QUERIES["payout_backlog"])
        self.metrics.charges_awaiting_payout.set(row["awaiting"])
        self.metrics.oldest_unpaid_charge_age.set(row["oldest_age_s"])
