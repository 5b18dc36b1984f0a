"""A real Prometheus scrapes a running worker and answers queries on its metrics.

The worker runs in this event loop (``running_worker``) with /metrics on a free port;
Prometheus (Debian's ``prometheus`` package) scrapes it every second with the alert rules
of deploy/ loaded. Also: ``promtool check metrics`` on the exposition, the image's
HEALTHCHECK command against the live worker, and every dashboard query accepted by the
server. Without the binaries this skips on a developer's machine and fails in CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support import (
    DEPLOY,
    charge,
    healthcheck_command,
    ingest_done,
    produce,
    record,
    running_worker,
    setup_pipeline,
    wait_for,
)
from workers.devtools.devstack import free_port
from workers.settings import Settings


def binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} not found; CI must install Debian's `prometheus` (.ci/run)")
        pytest.skip(f"{name} not found: `apt-get install prometheus` to run this test")
    return found


@contextlib.contextmanager
def prometheus_server(tmp_path: Path, metrics_port: int) -> Iterator[str]:
    """A Prometheus scraping 127.0.0.1:``metrics_port`` every second; yields its base URL."""
    executable = binary("prometheus")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(DEPLOY / "prometheus" / "rules.yml")],
                "scrape_configs": [
                    {
                        "job_name": "chargeline",
                        "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
                    }
                ],
            }
        )
    )
    log_path = tmp_path / "prometheus.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [
                executable,
                f"--config.file={config}",
                f"--web.listen-address=127.0.0.1:{port}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=20)
        if sys.exc_info()[0] is not None:  # failing: show why the server did what it did
            print(log_path.read_text(errors="replace")[-5000:])


async def get_json(session: aiohttp.ClientSession, url: str, **params: str) -> Any:
    async with session.get(url, params=params) as response:
        return await response.json()


@contextlib.asynccontextmanager
async def live_worker(settings: Settings) -> AsyncIterator[Settings]:
    """A worker with /metrics on a free loopback port that has processed one charge."""
    settings = settings.model_copy(
        update={"metrics_port": free_port(), "metrics_host": "127.0.0.1"}
    )
    await setup_pipeline(settings, partitions=1, flows=[("flow_a", "active")])
    async with running_worker(settings) as process:
        await produce(settings, settings.topic_charges, [record(charge("flow_a", "c1", "r1"))])
        await wait_for(functools.partial(ingest_done, process, 1), what="one charge processed")
        yield settings


async def test_prometheus_scrapes_a_live_worker_and_answers_queries(
    settings: Settings, tmp_path: Path
) -> None:
    async with live_worker(settings) as live, aiohttp.ClientSession() as session:
        with prometheus_server(tmp_path, live.metrics_port) as base:
            query = f"{base}/api/v1/query"

            async def answers(expression: str) -> list[dict[str, Any]]:
                try:
                    body = await get_json(session, query, query=expression)
                except aiohttp.ClientError:
                    return []  # not listening yet
                assert body["status"] == "success", body
                result: list[dict[str, Any]] = body["data"]["result"]
                return result

            async def scraped() -> bool:
                return bool(await answers("chargeline_worker_ready"))

            await wait_for(scraped, timeout=60, what="Prometheus to scrape the worker")
            (ready,) = await answers("chargeline_worker_ready")
            assert ready["metric"]["job"] == "chargeline"
            assert ready["metric"]["instance"] == f"127.0.0.1:{live.metrics_port}"
            assert ready["metric"]["worker"] == "charges+usage"
            assert ready["value"][1] == "1"
            recorded = await answers(
                f'chargeline_events_total{{topic="{live.topic_charges}", outcome="recorded"}}'
            )
            assert [sample["value"][1] for sample in recorded] == ["1"]
            (up,) = await answers('up{job="chargeline"}')
            assert up["value"][1] == "1"

            # The alert rules of deploy/ load and evaluate in a real server...
            rules = await get_json(session, f"{base}/api/v1/rules")
            groups = rules["data"]["groups"]
            assert {group["name"] for group in groups} == {
                "chargeline.availability",
                "chargeline.pipeline",
                "chargeline.money",
            }
            for group in groups:
                for rule in group["rules"]:
                    assert rule["health"] != "err", rule

            # ...and, once they have seen a scrape, none is pending or firing for a healthy
            # worker (an evaluation before the first scrape may leave one pending briefly).
            async def no_alerts() -> bool:
                return not await answers("ALERTS")

            await wait_for(no_alerts, timeout=30, what="no alert pending or firing")

            # Every query of the Grafana dashboard is valid PromQL for this server.
            board = json.loads((DEPLOY / "grafana" / "dashboards" / "chargeline.json").read_text())
            for panel in board["panels"]:
                for target in panel.get("targets", []):
                    expression = (
                        target["expr"].replace("$__rate_interval", "1m").replace("$__range", "5m")
                    )
                    body = await get_json(session, query, query=expression)
                    assert body["status"] == "success", (panel["title"], expression, body)


async def test_the_exposition_is_clean_for_promtool_and_the_healthcheck_passes(
    settings: Settings,
) -> None:
    promtool = binary("promtool")
    async with live_worker(settings) as live, aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{live.metrics_port}"
        async with session.get(f"{base}/metrics") as response:
            assert response.status == 200
            exposition = await response.read()
        assert b"chargeline_events_total" in exposition
        check = await asyncio.create_subprocess_exec(
            promtool,
            "check",
            "metrics",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(check.communicate(exposition), timeout=60)
        assert check.returncode == 0, output.decode()
        assert output.decode().strip() == "", f"promtool check metrics:\n{output.decode()}"

        # The Dockerfile's HEALTHCHECK, as the image runs it (`python` = this interpreter).
        command = healthcheck_command()
        started = time.monotonic()
        health = await asyncio.create_subprocess_exec(
            sys.executable,
            *command[1:],
            env={**os.environ, "CHARGELINE_METRICS_PORT": str(live.metrics_port)},
        )
        assert await asyncio.wait_for(health.wait(), timeout=30) == 0
        assert time.monotonic() - started < 10
