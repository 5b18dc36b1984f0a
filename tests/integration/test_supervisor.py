"""``chargeline worker --processes N``: N consumer-group members on one host, each with its
own /metrics; SIGTERM drains them all, and a child that dies takes the set down (non-zero),
as a single worker's death would."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys

import aiohttp
import psutil

from tests.support import (
    fetchval,
    produce,
    record,
    settings_env,
    setup_pipeline,
    usage,
    wait_for,
)
from workers.devtools.bench.worker import free_ports
from workers.settings import Settings


def start(settings: Settings, port: int, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings_env(settings), "CHARGELINE_METRICS_PORT": str(port)}
    return subprocess.Popen(
        [sys.executable, "-m", "workers.cli.main", "worker", *args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


async def ready(ports: list[int]) -> bool:
    async with aiohttp.ClientSession() as session:
        for port in ports:
            try:
                async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                    if response.status != 200:
                        return False
            except aiohttp.ClientError:
                return False
    return True


async def test_two_processes_share_the_partitions_and_stop_together(settings: Settings) -> None:
    await setup_pipeline(settings, partitions=4)
    ports = free_ports(2)
    parent = start(settings, ports[0], "--processes", "2", "all")
    try:
        await wait_for(functools.partial(ready, ports), what="both processes ready")
        children = psutil.Process(parent.pid).children()
        assert len(children) == 2
        events = [record(usage(f"c{n}", f"u{n}", 1)) for n in range(200)]
        await produce(settings, settings.topic_usage, events)

        async def applied() -> bool:
            return bool(await fetchval(settings, "SELECT count(*) FROM usage_events") == 200)

        await wait_for(applied, what="every event applied")
        parent.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(parent.wait, 60) == 0
        assert not any(child.is_running() and child.status() != "zombie" for child in children)
    finally:
        if parent.poll() is None:
            parent.kill()


async def test_a_child_that_dies_takes_the_set_down(settings: Settings) -> None:
    await setup_pipeline(settings, partitions=2)
    ports = free_ports(2)
    parent = start(settings, ports[0], "--processes", "2", "usage")
    try:
        await wait_for(functools.partial(ready, ports), what="both processes ready")
        first, second = psutil.Process(parent.pid).children()
        second.send_signal(signal.SIGKILL)
        assert await asyncio.to_thread(parent.wait, 60) != 0
        assert not (first.is_running() and first.status() != "zombie")
    finally:
        if parent.poll() is None:
            parent.kill()
