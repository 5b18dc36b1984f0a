"""A backfill of 1,000,000 events from a file: `chargeline publish` streams it in
bounded memory with progress and every record reaches the topic; `chargeline replay` then
applies the whole topic, also in bounded memory with progress, each event exactly once."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from tests.support import assert_invariants, fetchval, log_end_offsets, settings_env, setup_pipeline
from workers.settings import Settings

EVENTS = 1_000_000
# Peak resident sets. Measured here: publish about 80 MiB (the interpreter with its libraries
# and the producer's in-flight window; the file held in memory would add 150 MiB), replay
# about 140 MiB (the consumer's fetch buffers and one batch in hand).
PUBLISH_RSS_LIMIT_MIB = 200
REPLAY_RSS_LIMIT_MIB = 256


def _write_events(path: Path, count: int) -> None:
    with path.open("wb") as out:
        for n in range(count):
            event = {
                "type": "charge",
                "flow_id": f"flow_{n % 3}",
                "customer_ref": f"cust_{n % 5000}",
                "reference": f"backfill-{n}",
                "amount": 100 + n % 900,
                "currency": "EUR",
                "occurred_at": "2026-01-01T00:00:00Z",
            }
            out.write(orjson.dumps(event) + b"\n")


def _spawn(
    settings: Settings, args: list[str], out_path: Path, err_path: Path
) -> subprocess.Popen[bytes]:
    """`chargeline ARGS` with stdout and stderr to files (nothing to drain while it runs)."""
    with out_path.open("wb") as out, err_path.open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "workers.cli.main", *args],
            env={**os.environ, **settings_env(settings)},
            stdout=out,
            stderr=err,
        )


async def test_a_million_event_backfill_streams_with_progress(
    settings: Settings, tmp_path: Path
) -> None:
    flows = [(f"flow_{n}", "active") for n in range(3)]
    await setup_pipeline(settings, partitions=3, flows=flows)
    path = tmp_path / "backfill.jsonl"
    await asyncio.to_thread(_write_events, path, EVENTS)
    assert path.stat().st_size > 140 * 2**20  # held in memory, it would break the limit

    out_path, err_path = tmp_path / "publish.out", tmp_path / "publish.err"
    command = ["publish", "charges", str(path), "--format", "json"]
    report, stderr, peak_mib = await _run(settings, command, out_path, err_path)
    assert report["published"] == EVENTS
    rate = EVENTS / report["seconds"]
    print(f"publish: {EVENTS} events in {report['seconds']:.1f}s ({rate:,.0f}/s), "
          f"peak RSS {peak_mib:.0f} MiB")  # fmt: skip
    assert peak_mib < PUBLISH_RSS_LIMIT_MIB

    # Off a terminal, progress is a line every 100,000 records, for both passes.
    lines = stderr.splitlines()
    validated = [line for line in lines if line.startswith("validating: ")]
    published = [line for line in lines if line.startswith("publishing: ")]
    assert len(validated) == 10 and validated[-1].startswith("validating: 1,000,000 records")
    assert len(published) >= 9
    assert re.match(r"publishing: 1,000,000/1,000,000 records \(100%\)", published[-1])

    ends = await log_end_offsets(settings, settings.topic_charges)
    assert sum(ends.values()) == EVENTS

    command = ["replay", "--topic", "charges", "--format", "json"]
    report, stderr, peak_mib = await _run(settings, command, out_path, err_path)
    rate = EVENTS / report["seconds"]
    print(f"replay: {EVENTS} events in {report['seconds']:.1f}s ({rate:,.0f}/s), "
          f"peak RSS {peak_mib:.0f} MiB")  # fmt: skip
    assert (report["read"], report["applied"], report["dead_letters"]) == (EVENTS, EVENTS, 0)
    assert report["changes"]["new_charges"][0]["count"] == EVENTS // 3 + 1
    assert sum(row["count"] for row in report["changes"]["new_charges"]) == EVENTS
    assert peak_mib < REPLAY_RSS_LIMIT_MIB
    # A line every five seconds, the last one at the end of the range.
    progress = [line for line in stderr.splitlines() if line.startswith("replay: ")]
    assert len(progress) >= 2
    assert progress[-1].startswith("replay: 1,000,000/1,000,000 records (100%)")
    assert await fetchval(settings, "SELECT count(*) FROM charges") == EVENTS
    await assert_invariants(settings)


async def _run(
    settings: Settings, args: list[str], out_path: Path, err_path: Path
) -> tuple[dict[str, Any], str, float]:
    """Run `chargeline ARGS` to its end: (JSON report, stderr, peak RSS in MiB)."""
    child = _spawn(settings, args, out_path, err_path)
    # wait4: the peak RSS of this child alone, not of every child the test run has had.
    _, status, usage = await asyncio.to_thread(os.wait4, child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    stderr = err_path.read_text()
    assert child.returncode == 0, stderr
    return orjson.loads(out_path.read_bytes()), stderr, usage.ru_maxrss / 1024  # KiB on Linux
