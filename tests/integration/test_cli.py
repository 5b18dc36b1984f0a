"""The command line against real servers: flows, charges, publish, one-line errors."""

from __future__ import annotations

import csv
import functools
import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import orjson

from tests.support import (
    assert_one_line_error,
    charge,
    cli,
    consume_all,
    ingest_done,
    ok_json,
    produce,
    record,
    running_worker,
    settings_env,
    setup_pipeline,
    wait_for,
)
from workers.settings import Settings


async def test_flows_lifecycle(settings: Settings) -> None:
    created = ok_json(
        settings, "flows", "create", "flow_x", "--name", "Image jobs", "--payee", "acme"
    )
    assert created == {
        **created,
        "flow_id": "flow_x",
        "payee_ref": "acme",
        "status": "active",
        "charge_count": 0,
    }
    assert ok_json(settings, "flows", "pause", "flow_x")["status"] == "paused"
    assert ok_json(settings, "flows", "resume", "flow_x")["status"] == "active"
    listed = ok_json(settings, "flows", "list")
    assert [f["flow_id"] for f in listed] == ["flow_x"]
    assert_one_line_error(
        cli(settings, "flows", "create", "flow_x", "--name", "again"),
        code=2,
        mentions="already exists",
    )
    assert_one_line_error(
        cli(settings, "flows", "pause", "nope"), code=1, mentions="no flow 'nope'"
    )


async def test_bad_arguments_get_one_line(settings: Settings) -> None:
    assert_one_line_error(
        cli(settings, "charges", "list", "--since", "yesterday"), code=2, mentions="invalid time"
    )
    assert_one_line_error(cli(settings, "charges", "list", "--limit", "0"), code=2, mentions=">= 1")
    assert_one_line_error(cli(settings, "flows", "create", "f"), code=2, mentions="--name")
    assert_one_line_error(cli(settings, "frobnicate"), code=2, mentions="invalid choice")
    bad_env = subprocess.run(
        [sys.executable, "-m", "workers.cli.main", "flows", "list"],
        env={
            **os.environ,
            **settings_env(settings),
            "CHARGELINE_KAFKA_BOOTSTRAP_SERVERS": "nohost",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert_one_line_error(bad_env, code=2, mentions="CHARGELINE_KAFKA_BOOTSTRAP_SERVERS")


async def test_a_busy_metrics_port_is_named_as_such(settings: Settings) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        busy = settings.model_copy(update={"metrics_host": "127.0.0.1", "metrics_port": port})
        done = cli(busy, "worker", "expiry")
    assert_one_line_error(done, code=1, mentions=f"cannot serve /metrics on 127.0.0.1:{port}")


async def test_charges_list_filters_and_formats(settings: Settings) -> None:
    await setup_pipeline(settings, partitions=1, flows=[("flow_a", "active"), ("flow_b", "active")])
    events = [
        charge("flow_a", "alice", "a1", 100, metadata={"job": "1"}),
        charge("flow_a", "bob", "a2", 250, currency="jpy"),
        charge("flow_b", "alice", "b1", 999, currency="KWD"),
    ]
    async with running_worker(settings, "charges") as process:
        await produce(settings, settings.topic_charges, [record(e) for e in events])
        await wait_for(functools.partial(ingest_done, process, 3), what="3 charges")
    everything = ok_json(settings, "charges", "list")
    assert {c["reference"] for c in everything} == {"a1", "a2", "b1"}
    first = next(c for c in everything if c["reference"] == "a1")
    assert set(first) >= {
        "flow_id",
        "customer_ref",
        "reference",
        "amount",
        "currency",
        "status",
        "metadata",
        "occurred_at",
        "recorded_at",
    }
    assert first["metadata"] == {"job": "1"}
    assert next(c for c in everything if c["reference"] == "a2")["currency"] == "JPY"
    by_flow = ok_json(settings, "charges", "list", "--flow", "flow_a", "--customer", "alice")
    assert [c["reference"] for c in by_flow] == ["a1"]
    assert ok_json(settings, "charges", "list", "--until", "2000-01-01") == []
    assert (
        len(ok_json(settings, "charges", "list", "--since", "2000-01-01", "--status", "recorded"))
        == 3
    )
    table = cli(settings, "charges", "list", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(table.stdout)))
    assert sorted(r["amount"] for r in rows) == ["100", "250", "999"]
    shown = ok_json(settings, "charges", "show", "b1")
    assert shown["flow_id"] == "flow_b"
    assert_one_line_error(cli(settings, "charges", "show", "nope"), code=1, mentions="no charge")


async def test_publish_validates_the_whole_file_first(settings: Settings, tmp_path: Path) -> None:
    await setup_pipeline(settings, partitions=1, flows=[("flow_a", "active")])
    good = [orjson.dumps(charge("flow_a", "c1", f"r{n}")).decode() for n in range(5)]
    bad_file = tmp_path / "bad.jsonl"
    bad_file.write_text(
        "\n".join([good[0], good[1], '{"type": "charge", "amount": 1.5}', good[2]]) + "\n"
    )
    done = cli(settings, "publish", settings.topic_charges, str(bad_file))
    assert done.returncode == 1
    assert f"{bad_file}:3: invalid_event" in done.stderr
    assert "nothing published" in done.stderr
    assert await consume_all(settings, settings.topic_charges, expected=1, timeout=3) == []

    good_file = tmp_path / "good.jsonl"
    good_file.write_text("\ufeff" + "\n".join(good) + "\n")  # a byte order mark: skipped
    report = ok_json(settings, "publish", settings.topic_charges, str(good_file))
    assert report["published"] == 5
    published = await consume_all(settings, settings.topic_charges, expected=5)
    assert [m.key for m in published] == [b"c1"] * 5
    assert_one_line_error(
        cli(settings, "publish", "other.topic", str(good_file)),
        code=2,
        mentions="not an input topic",
    )
    assert_one_line_error(
        cli(settings, "publish", settings.topic_charges, "/no/such.jsonl"),
        code=2,
        mentions="no such file",
    )


async def test_topics_ensure_says_when_a_topic_has_other_partitions(settings: Settings) -> None:
    first = cli(settings, "topics", "ensure", "--partitions", "2")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("created 5 topic(s)") and first.stderr == ""
    again = cli(settings, "topics", "ensure", "--partitions", "2")
    assert (again.returncode, again.stdout.strip(), again.stderr) == (0, "created 0 topic(s)", "")
    other = cli(settings, "topics", "ensure", "--partitions", "3")
    assert other.returncode == 0
    warnings = other.stderr.strip().splitlines()
    assert len(warnings) == 5
    assert f"{settings.topic_usage} exists with 2 partitions, not 3: left as it is" in other.stderr
