"""`chargeline verify` passes on a healthy database and finds deliberate corruption."""

from __future__ import annotations

import functools
from typing import Any

import asyncpg

from tests.support import (
    charge,
    cli,
    grant,
    ingest_done,
    outbox_empty,
    produce,
    record,
    running_worker,
    setup_pipeline,
    usage,
    wait_for,
)
from workers.settings import Settings


async def _load(settings: Settings) -> None:
    await setup_pipeline(settings, partitions=2, flows=[("flow_a", "active")])
    usage_events = [
        grant("c1", "g1", 100),
        usage("c1", "u1", 150),
        grant("c1", "g2", 500),
        usage("c2", "u2", 5),
    ]
    charges = [
        record(charge("flow_a", "c1", "r1")),
        record(charge("flow_a", "c1", "r1", 7)),
        record(b"{bad", "c1"),
    ]
    async with running_worker(settings) as process:
        await produce(settings, settings.topic_usage, [record(e) for e in usage_events])
        await produce(settings, settings.topic_charges, charges)
        await wait_for(functools.partial(ingest_done, process, 7), what="7 records")
        await wait_for(functools.partial(outbox_empty, settings), what="outbox")


def verdict(settings: Settings) -> tuple[int, dict[str, Any]]:
    import orjson

    done = cli(settings, "verify", "--format", "json")
    return done.returncode, orjson.loads(done.stdout)


async def test_verify_passes_then_finds_each_corruption(settings: Settings) -> None:
    await _load(settings)
    code, report = verdict(settings)
    assert (code, report["ok"], report["violations"]) == (0, True, [])

    conn = await asyncpg.connect(settings.dsn)
    try:
        await conn.execute("UPDATE customers SET balance = balance + 1 WHERE customer_ref = 'c1'")
        code, report = verdict(settings)
        assert code == 1 and not report["ok"]
        assert {v["check"] for v in report["violations"]} == {"balances"}
        assert report["violations"][0]["rows"][0]["customer_ref"] == "c1"
        await conn.execute("UPDATE customers SET balance = balance - 1 WHERE customer_ref = 'c1'")

        # An entry whose usage event is gone: what the ledger's foreign keys used to refuse.
        moved = await conn.fetchval(
            "UPDATE ledger_entries SET usage_id = usage_id + 1000000 "
            "WHERE customer_ref = 'c2' AND usage_id IS NOT NULL RETURNING reference"
        )
        code, report = verdict(settings)
        checks = {v["check"] for v in report["violations"]}
        assert (moved, code) == ("u2", 1) and "ledger_references" in checks
        await conn.execute(
            "UPDATE ledger_entries SET usage_id = usage_id - 1000000 "
            "WHERE customer_ref = 'c2' AND usage_id IS NOT NULL"
        )

        # A charge whose flow is gone: what the charges' foreign key used to refuse (0007).
        await conn.execute("UPDATE charges SET flow_id = 'flow_gone' WHERE reference = 'r1'")
        code, report = verdict(settings)
        assert code == 1 and {v["check"] for v in report["violations"]} == {"charge_flows"}
        assert report["violations"][0]["rows"][0]["flow_id"] == "flow_gone"
        await conn.execute("UPDATE charges SET flow_id = 'flow_a' WHERE reference = 'r1'")

        await conn.execute("DELETE FROM ledger_entries WHERE customer_ref = 'c2'")
        code, report = verdict(settings)
        checks = {v["check"] for v in report["violations"]}
        assert code == 1 and {"balances", "usage_applied_once"} <= checks
    finally:
        await conn.close()
    table = cli(settings, "verify")
    assert table.returncode == 1
    assert "invariant 2 (balances)" in table.stdout and "c2" in table.stdout


async def test_verify_finds_a_charge_claimed_by_two_payouts(settings: Settings) -> None:
    await _load(settings)
    done = cli(settings, "payouts", "run")
    assert done.returncode == 0, done.stderr
    code, report = verdict(settings)
    assert (code, report["violations"]) == (0, [])
    conn = await asyncpg.connect(settings.dsn)
    try:
        # A second payout claiming the same charge (its copy of the first payout's totals).
        await conn.execute(
            "INSERT INTO payouts (payout_id, cut_id, payee_ref, currency, period_start, period_end,"
            " charge_count, amount, status) SELECT payout_id || '-copy', cut_id, payee_ref, currency,"
            " period_start, period_end + interval '1 hour', charge_count, amount, status FROM payouts"
        )
    finally:
        await conn.close()
    code, report = verdict(settings)
    assert code == 1
    [violation] = report["violations"]
    assert (violation["invariant"], violation["check"]) == (3, "payouts")
    assert violation["rows"][0]["payout_id"].endswith("-copy")


async def test_verify_finds_usage_paid_out_of_consumption_order(settings: Settings) -> None:
    """The ledger paid g-new for u1, as it must (priority 0 and cost 0 before priority 3);
    entries rewritten so g-old paid instead, with every sum still right, are found."""
    await setup_pipeline(settings, partitions=1)
    events = [
        grant("x", "g-old", 100, priority=3),
        grant("x", "g-new", 100, cost_basis="0"),
        usage("x", "u1", 50),
    ]
    async with running_worker(settings, "usage") as process:
        await produce(settings, settings.topic_usage, [record(e) for e in events])
        await wait_for(functools.partial(ingest_done, process, 3), what="3 records")
    code, report = verdict(settings)
    assert (code, report["violations"]) == (0, [])
    conn = await asyncpg.connect(settings.dsn)
    try:
        ids = dict(await conn.fetch("SELECT reference, grant_id FROM grants"))
        assert (
            await conn.fetchval("SELECT grant_id FROM ledger_entries WHERE reference = 'u1'")
            == ids["g-new"]
        )
        await conn.execute(
            "UPDATE ledger_entries SET grant_id = $1 WHERE reference = 'u1'", ids["g-old"]
        )
        await conn.execute(
            "UPDATE grants SET remaining = CASE reference WHEN 'g-old' THEN 50 ELSE 100 END"
        )
    finally:
        await conn.close()
    code, report = verdict(settings)
    assert code == 1
    [violation] = report["violations"]
    assert violation["check"] == "consumption_order"
    assert violation["rows"] == [
        {"customer_ref": "x", "seq": 3, "usage_reference": "u1", "paid_by": "g-old",
         "passed_over": "g-new"}
    ]  # fmt: skip
