"""`chargeline verify` passes on a healthy database and finds deliberate corruption."""

from __future__ import annotations

import functools
from typing import Any

import asyncpg
from structlog.testing import capture_logs

from tests.support import (
    charge,
    cli,
    fetchval,
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


def verdict(settings: Settings, *args: str) -> tuple[int, dict[str, Any]]:
    import orjson

    done = cli(settings, "verify", "--format", "json", *args)
    return done.returncode, orjson.loads(done.stdout)


async def test_verify_passes_then_finds_each_corruption(settings: Settings) -> None:
    await _load(settings)
    code, report = verdict(settings)
    assert (code, report["ok"], report["violations"]) == (0, True, [])
    assert report["mode"] == "recent" and report["scope"]["since"] is None

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
        # History the checkpoint covers, rewritten: what --full is for.
        code, report = verdict(settings, "--full")
        checks = {v["check"] for v in report["violations"]}
        assert (moved, code) == ("u2", 1) and "ledger_references" in checks
        await conn.execute(
            "UPDATE ledger_entries SET usage_id = usage_id - 1000000 "
            "WHERE customer_ref = 'c2' AND usage_id IS NOT NULL"
        )

        # A charge whose flow is gone: what the charges' foreign key used to refuse (0007).
        await conn.execute("UPDATE charges SET flow_id = 'flow_gone' WHERE reference = 'r1'")
        code, report = verdict(settings, "--full")
        assert code == 1 and {v["check"] for v in report["violations"]} == {"charge_flows"}
        assert report["violations"][0]["rows"][0]["flow_id"] == "flow_gone"
        await conn.execute("UPDATE charges SET flow_id = 'flow_a' WHERE reference = 'r1'")

        await conn.execute("DELETE FROM ledger_entries WHERE customer_ref = 'c2'")
        code, report = verdict(settings, "--full")
        checks = {v["check"] for v in report["violations"]}
        assert code == 1 and {"balances", "usage_applied_once"} <= checks
    finally:
        await conn.close()
    table = cli(settings, "verify", "--full")
    assert table.returncode == 1
    assert "invariant 2 (balances)" in table.stdout and "c2" in table.stdout
    assert "all history" in table.stdout


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
    code, report = verdict(settings, "--full")  # no checkpoint: the next run reads it all
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


# --- since the checkpoint ---------------------------------------------------------------


async def _recent(settings: Settings) -> Any:
    from workers.jobs.verify import verify_recent

    conn, fence = await asyncpg.connect(settings.dsn), await asyncpg.connect(settings.dsn)
    try:
        return await verify_recent(conn, fence)
    finally:
        await conn.close()
        await fence.close()


async def test_verify_checks_what_came_after_its_checkpoint(settings: Settings) -> None:
    await _load(settings)
    entries = await fetchval(settings, "SELECT count(*) FROM ledger_entries")
    code, report = verdict(settings)
    assert (code, report["scope"]["entries"], report["scope"]["customers"]) == (0, entries, 2)
    code, report = verdict(settings)
    assert (code, report["scope"]["entries"]) == (0, 0) and report["scope"]["since"]

    # New usage after the checkpoint, one of its entries rewritten before verify runs.
    async with running_worker(settings, "usage") as process:
        await produce(settings, settings.topic_usage, [record(usage("c1", "u3", 40))])
        await wait_for(functools.partial(ingest_done, process, 1), what="1 record")
    conn = await asyncpg.connect(settings.dsn)
    try:
        await conn.execute(
            "UPDATE ledger_entries SET usage_id = usage_id + 1000000 WHERE reference = 'u3'"
        )
        for _ in range(2):  # a failing run leaves the checkpoint where it was
            code, report = verdict(settings)
            checks = {v["check"] for v in report["violations"]}
            assert code == 1 and checks == {"ledger_references", "usage_applied_once"}
            assert report["scope"]["entries"] == 1
        await conn.execute(
            "UPDATE ledger_entries SET usage_id = usage_id - 1000000 WHERE reference = 'u3'"
        )
        code, report = verdict(settings)
        assert (code, report["scope"]["entries"], report["scope"]["customers"]) == (0, 1, 1)

        # An alert checked before, put in the outbox again: it would be sent twice.
        copy = await conn.fetchval(
            "INSERT INTO outbox (kind, topic, record_key, record_value, published_at)"
            " SELECT kind, topic, record_key, record_value, now() FROM outbox"
            " WHERE kind = 'alert' ORDER BY outbox_id LIMIT 1 RETURNING outbox_id"
        )
        code, report = verdict(settings)
        assert code == 1 and {v["check"] for v in report["violations"]} == {"alerts_in_outbox"}
        await conn.execute("DELETE FROM outbox WHERE outbox_id = $1", copy)

        # A grant's tokens changed with no ledger entry: its state is compared whole.
        await conn.execute("UPDATE grants SET remaining = remaining + 5 WHERE reference = 'g2'")
        code, report = verdict(settings)
        assert code == 1 and {v["check"] for v in report["violations"]} == {"grants"}
        await conn.execute("UPDATE grants SET remaining = remaining - 5 WHERE reference = 'g2'")

        # An old charge's flow rewritten: history the checkpoint covers is --full's to read.
        await conn.execute("UPDATE charges SET flow_id = 'flow_gone' WHERE reference = 'r1'")
        assert verdict(settings)[0] == 0
        code, report = verdict(settings, "--full")
        assert code == 1 and report["mode"] == "full" and report["scope"] is None
        assert {v["check"] for v in report["violations"]} == {"charge_flows"}
    finally:
        await conn.close()


async def test_verify_runs_beside_ingestion_and_misses_nothing(settings: Settings) -> None:
    """Runs taken while a worker writes each see a consistent cut, and their checkpoints
    together cover every row: at the end the checkpoint is at the last entry of every
    customer and the last usage event, and a full run agrees."""
    await setup_pipeline(settings, partitions=2)
    customers = [f"k{i}" for i in range(20)]
    events = [record(grant(c, "g", 1_000)) for c in customers]
    events += [record(usage(c, f"u{n}", 7)) for n in range(150) for c in customers]
    runs = []
    async with running_worker(settings, "usage") as process:
        await produce(settings, settings.topic_usage, events[:20])
        await wait_for(functools.partial(ingest_done, process, 20), what="the grants")
        for start in range(20, len(events), 100):
            await produce(settings, settings.topic_usage, events[start : start + 100])
            runs.append(await _recent(settings))
        while not await ingest_done(process, len(events)):
            runs.append(await _recent(settings))
        runs.append(await _recent(settings))
    assert all(run.ok for run in runs), [v.as_dict() for run in runs for v in run.violations]
    assert sum(1 for run in runs if run.scope.entries) >= 2, "no run saw ingestion under way"
    assert sum(run.scope.entries for run in runs) == await fetchval(
        settings, "SELECT count(*) FROM ledger_entries"
    )
    behind = await fetchval(
        settings,
        "SELECT count(*) FROM customers c LEFT JOIN verify_customer_checkpoints k"
        " USING (customer_ref) WHERE k.seq IS DISTINCT FROM c.ledger_seq",
    )
    usage_through = await fetchval(settings, "SELECT usage_id_through FROM verify_checkpoint")
    assert (behind, usage_through) == (
        0,
        await fetchval(settings, "SELECT max(usage_id) FROM usage_events"),
    )
    assert verdict(settings, "--full")[0] == 0


async def test_verify_waits_for_a_writer_in_flight_and_gives_up_on_one_held_open(
    settings: Settings, monkeypatch: Any
) -> None:
    """A usage event written by a transaction in flight as verify starts is not skipped:
    the fence waits for that transaction. One that holds the tables past the fence's
    attempts fails the run with a clear error, is not harmed, and nothing moves."""
    import asyncio

    import pytest

    from workers.jobs import verify as verify_module

    await _load(settings)
    assert (await _recent(settings)).ok
    writer = await asyncpg.connect(settings.dsn)
    try:
        # Numbered now, committed 0.5 s after the run has started.
        transaction = writer.transaction()
        await transaction.start()
        await writer.execute(
            "INSERT INTO usage_events (customer_ref, reference, tokens, occurred_at,"
            " fingerprint, source_topic, source_partition, source_offset)"
            " VALUES ('c9', 'late', 3, now(), '\\x00', 'test', 0, 0)"
        )
        run = asyncio.create_task(_recent(settings))
        await asyncio.sleep(0.5)
        assert not run.done()  # waiting for the writer
        await transaction.commit()
        report = await run
        # Seen, and found: a usage event with no ledger entry.
        assert not report.ok
        [violation] = report.violations
        assert violation.check == "usage_applied_once"
        assert violation.rows[0]["reference"] == "late"
        await writer.execute("DELETE FROM usage_events WHERE reference = 'late'")

        monkeypatch.setattr(verify_module, "FENCE_LOCK_TIMEOUTS_MS", (100, 100))
        monkeypatch.setattr(verify_module, "FENCE_PAUSE_S", 0.05)
        async with writer.transaction():
            await writer.execute("LOCK TABLE usage_events IN ROW EXCLUSIVE MODE")
            with (
                capture_logs() as logs,
                pytest.raises(verify_module.FenceUnavailable, match="never free of writers"),
            ):
                await _recent(settings)
            assert await writer.fetchval("SELECT count(*) FROM usage_events") == 2
        # Each attempt says who held it off: the operator's way to the writer.
        busy = [line for line in logs if line["event"] == "verify_fence_busy"]
        assert [line["attempt"] for line in busy] == [1, 2]
        assert all(
            [holder["pid"] for holder in line["holders"]] == [writer.get_server_pid()]
            for line in busy
        )
    finally:
        await writer.close()
    report = await _recent(settings)
    assert report.ok and report.scope.entries == 0
