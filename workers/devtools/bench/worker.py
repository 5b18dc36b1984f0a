"""The worker under test: a real ``chargeline worker all`` process, watched from outside.

The bench measures the process a deployment runs, not the worker's code called in-process,
so its figures include everything that process pays for (the event loop, metrics, logs).
What it has done is read from its Prometheus endpoint, its CPU and memory from the OS.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from prometheus_client.parser import text_string_to_metric_families

from workers.settings import Settings


def _poll_pause(events: float, at_least: float, first: float | None, now: float) -> float:
    """Seconds until the next poll of the worker's metrics: 50 ms around the start and the
    end of a drain, where the poll times are the measurement; up to a second in between,
    since each scrape renders every metric in the worker, on the CPU being measured.
    """
    if first is None or events <= 0 or now <= first:
        return 0.05
    remaining_s = (at_least - events) / (events / (now - first))
    return min(1.0, max(0.05, remaining_s / 2))


class WorkerRun:
    """A real ``chargeline worker`` process (``all`` unless ``kinds`` says otherwise),
    watched through its /metrics; with ``processes`` above 1, ``chargeline worker
    --processes N`` and its N children, their metrics summed."""

    def __init__(
        self,
        settings: Settings,
        log: Path,
        kinds: tuple[str, ...] = ("all",),
        *,
        processes: int = 1,
    ) -> None:
        self.ports = free_ports(processes)
        self.port = self.ports[0]
        env = {
            **os.environ,
            **settings.model_copy(update={"metrics_port": self.port}).as_env(),
        }
        several = ["--processes", str(processes)] if processes > 1 else []
        with log.open("ab") as out:
            self.process = subprocess.Popen(  # noqa: S603 -- our own module, arguments we build.
                [sys.executable, "-m", "workers.cli.main", "worker", *several, *kinds],
                env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.ps = psutil.Process(self.process.pid)
        self.processes = processes

    def _workers(self) -> list[psutil.Process]:
        """The processes that do the work: the worker, or the supervisor's children."""
        if self.processes == 1:
            return [self.ps]
        try:
            return list(self.ps.children())
        except psutil.NoSuchProcess:
            return []

    async def metrics(self) -> dict[str, Any]:
        """Events counted and the event-lag histogram, summed over the worker processes."""
        texts = []
        async with aiohttp.ClientSession() as session:
            for port in self.ports:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                        texts.append(await response.text())
                except aiohttp.ClientError:
                    continue
        if not texts:
            return {}
        samples: dict[str, Any] = {"events": 0.0, "lag_buckets": {}, "lag_count": 0.0}
        for family in text_string_to_metric_families("\n".join(texts)):
            for s in family.samples:
                if s.name == "chargeline_events_total":
                    samples["events"] += s.value
                elif s.name == "chargeline_event_lag_seconds_bucket":
                    le = float(s.labels["le"])
                    samples["lag_buckets"][le] = samples["lag_buckets"].get(le, 0.0) + s.value
                elif s.name == "chargeline_event_lag_seconds_count":
                    samples["lag_count"] += s.value
        return samples

    async def wait_events(self, at_least: float, *, limit_s: float = 900) -> tuple[float, float]:
        """(when processing started, when ``at_least`` events were counted).

        The start is the last poll that still saw no event: a little early (by at most one
        poll interval, which only lowers the rate), and never the moment the last one is
        counted, even when a small load drains between two polls."""
        first: float | None = None
        idle_until = time.monotonic()
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}")
            polled = time.monotonic()
            events = (await self.metrics()).get("events", 0.0)
            now = time.monotonic()
            if first is None:
                if events > 0:
                    first = idle_until
                else:
                    idle_until = polled
            if events >= at_least:
                return first if first is not None else idle_until, now
            await asyncio.sleep(_poll_pause(events, at_least, first, now))
        raise TimeoutError(f"worker did not reach {at_least} events in {limit_s}s")

    def cpu_seconds(self) -> float:
        """CPU seconds of the worker processes (and of a supervisor, which does next to
        nothing)."""
        total = 0.0
        for process in {self.ps, *self._workers()}:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = process.cpu_times()
                total += times.user + times.system
        return total

    def peak_rss_mib(self) -> float:
        """The largest peak resident set of one worker process."""
        peaks = [float("nan")]
        for process in self._workers():
            with contextlib.suppress(OSError), open(f"/proc/{process.pid}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        peaks.append(int(line.split()[1]) / 1024)
        return max(peaks[1:], default=peaks[0])

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """``count`` consecutive free loopback ports (a supervisor gives child i its base + i)."""
    for _ in range(100):
        base = free_port()
        try:
            with contextlib.ExitStack() as held:
                for port in range(base, base + count):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return list(range(base, base + count))
    raise RuntimeError(f"no {count} consecutive free ports")
