"""Two transactions writing the same key at once, on a real Postgres.

The record_* statements tell a duplicate from a conflict by what their snapshot holds. A key
that another transaction commits while the statement waits on it is in neither the rows the
statement inserted nor its snapshot: the handler looks such keys up once more
(``resolve_races``), and the event is judged against what won, as any later copy would be.
The same holds for a customer that two batches create at once (``lock_customers``).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka.structs import ConsumerRecord

from tests.support import charge, create_flows, fetchval, usage, wait_for
from workers.ingest.charges import ChargesHandler
from workers.ingest.dedupe import Verdict, judge
from workers.ingest.parse import Parsed, parse_records
from workers.ingest.processor import Handler
from workers.ingest.usage import UsageHandler
from workers.settings import Settings


def parsed(handler: Handler, event: dict[str, Any]) -> list[Parsed]:
    record = ConsumerRecord(
        topic=handler.topic,
        partition=0,
        offset=0,
        timestamp=1_700_000_000_000,
        timestamp_type=0,
        key=event["customer_ref"].encode(),
        value=orjson.dumps(event),
        checksum=None,
        serialized_key_size=0,
        serialized_value_size=0,
        headers=(),
    )
    events, rejected = parse_records(
        [record], accepted_types=handler.accepted_types, max_event_bytes=65_536
    )
    assert not rejected
    return events


async def race(
    settings: Settings, handler: Handler, first: dict[str, Any], second: dict[str, Any]
) -> tuple[Verdict, Verdict, list[Parsed]]:
    """Apply ``first`` in one transaction and, while it is open, ``second`` in another; then
    commit the first. The second's statement waits on the first's uncommitted key, and
    commits after it."""
    one, two, watcher = [await asyncpg.connect(settings.dsn) for _ in range(3)]
    try:
        first_events, second_events = parsed(handler, first), parsed(handler, second)
        two_pid = await two.fetchval("SELECT pg_backend_pid()")

        async def second_waits_on_a_lock() -> bool:
            state = await watcher.fetchval(
                "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", two_pid
            )
            return bool(state == "Lock")

        one_tx, two_tx = one.transaction(), two.transaction()
        await one_tx.start()
        [first_verdict] = await handler.apply(one, first_events, Counter())
        await two_tx.start()
        pending = asyncio.create_task(handler.apply(two, second_events, Counter()))
        await wait_for(second_waits_on_a_lock, timeout=10, what="the second statement to wait")
        await one_tx.commit()
        [second_verdict] = await asyncio.wait_for(pending, timeout=30)
        await two_tx.commit()
        return first_verdict, second_verdict, second_events
    finally:
        for conn in (one, two, watcher):
            await conn.close()


async def outcome_of_the_second(
    settings: Settings, handler: Handler, first: dict[str, Any], second: dict[str, Any]
) -> str:
    """Race two events of one key: the first is recorded, the second not, and judged so."""
    first_verdict, second_verdict, second_events = await race(settings, handler, first, second)
    assert first_verdict.recorded
    assert not second_verdict.recorded
    [(_, _, name)] = judge(second_events, [second_verdict], []).counts
    return name


SAME_USAGE = usage("c1", "u1", 30, feature="chat")
SAME_CHARGE = charge("flow_a", "c1", "r1", 250)


@pytest.mark.parametrize(
    ("second", "expected"),
    [(SAME_USAGE, "duplicate"), ({**SAME_USAGE, "tokens": 31}, "conflict")],
    ids=["same payload", "another payload"],
)
async def test_a_usage_key_committed_while_the_statement_waits_is_judged_against_it(
    settings: Settings, second: dict[str, Any], expected: str
) -> None:
    handler = UsageHandler(settings.topic_usage, settings.topic_alerts)
    assert await outcome_of_the_second(settings, handler, SAME_USAGE, second) == expected
    assert await fetchval(settings, "SELECT count(*) FROM usage_events") == 1
    assert await fetchval(settings, "SELECT count(*) FROM ledger_entries") == 1
    assert await fetchval(settings, "SELECT balance FROM customers") == -30


@pytest.mark.parametrize(
    ("second", "expected"),
    [(SAME_CHARGE, "duplicate"), ({**SAME_CHARGE, "amount": 251}, "conflict")],
    ids=["same payload", "another payload"],
)
async def test_a_charge_key_committed_while_the_statement_waits_is_judged_against_it(
    settings: Settings, second: dict[str, Any], expected: str
) -> None:
    await create_flows(settings, [("flow_a", "payee")])
    handler = ChargesHandler(settings.topic_charges)
    assert await outcome_of_the_second(settings, handler, SAME_CHARGE, second) == expected
    assert await fetchval(settings, "SELECT count(*) FROM charges") == 1


async def test_a_customer_created_by_another_transaction_meanwhile_is_locked_and_charged(
    settings: Settings,
) -> None:
    """The second batch's usage is new, but its customer is being created by the first:
    the statement that creates and locks customers waits, finds it in neither its inserts
    nor its snapshot, and the customer is locked and charged after the first's usage."""
    handler = UsageHandler(settings.topic_usage, settings.topic_alerts)
    first_verdict, second_verdict, _ = await race(
        settings, handler, usage("c1", "u1", 30), usage("c1", "u2", 20)
    )
    assert first_verdict.recorded and second_verdict.recorded
    assert await fetchval(settings, "SELECT balance FROM customers") == -50
    assert await fetchval(settings, "SELECT ledger_seq FROM customers") == 2
    seqs = await fetchval(
        settings, "SELECT array_agg(seq ORDER BY seq) FROM ledger_entries WHERE customer_ref = 'c1'"
    )
    assert seqs == [1, 2]
