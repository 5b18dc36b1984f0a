"""The soak's worker processes: two roles, each a real ``chargeline worker`` process (the
bench's ``WorkerRun``) restarted as the schedule says, with every incarnation recorded.

- ``ingest``: every kind of ``worker all`` but the outbox relay (the consumer of both input
  topics, the periodic workers, the lag monitor). SIGKILLed and started again every crash
  period, as a crash and an orchestrator's restart would.
- ``relay``: ``worker outbox`` alone, so that it can be stopped (SIGTERM, drained) and
  started again once, apart from the crashes.

Between them they run exactly what ``worker all`` runs (``tests/unit/test_soak.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from prometheus_client.parser import text_string_to_metric_families

from workers.devtools.bench.worker import WorkerRun
from workers.devtools.soak.figures import RssSample
from workers.kinds import WORKER_KINDS
from workers.settings import Settings

RELAY_KINDS = ("outbox",)
INGEST_KINDS = tuple(kind for kind in WORKER_KINDS if kind not in ("all", "verify", *RELAY_KINDS))
READY_LIMIT_S = 60.0
SETTLE_S = 10.0  # a process's first seconds are not sampled


@dataclass
class Incarnation:
    """One process of a role, from its start to its end."""

    number: int
    pid: int
    started_s: float
    ended_s: float | None = None
    end: str = "running"
    events: float = 0.0  # ingest: records it had applied when last read
    consuming_s: float | None = None  # ingest: when it first applied a record
    caught_up_s: float | None = None  # ingest: when it had caught up with the load

    def as_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "pid": self.pid,
            "started_min": self.started_s / 60,
            "ended_min": None if self.ended_s is None else self.ended_s / 60,
            "end": self.end,
            **(
                {
                    "consuming_min": _minutes(self.consuming_s),
                    "caught_up_min": _minutes(self.caught_up_s),
                }
                if self.consuming_s is not None or self.caught_up_s is not None
                else {}
            ),
        }


def _minutes(seconds: float | None) -> float | None:
    return None if seconds is None else seconds / 60


@dataclass
class Role:
    """A role's current process and its history: incarnations and RSS samples."""

    name: str
    kinds: tuple[str, ...]
    settings: Settings
    log: Path
    worker: WorkerRun | None = None
    incarnations: list[Incarnation] = field(default_factory=list)
    rss: list[RssSample] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def current(self) -> Incarnation:
        return self.incarnations[-1]

    def start(self, at_s: float) -> WorkerRun:
        worker = WorkerRun(self.settings, self.log, kinds=self.kinds)
        self.worker = worker
        self.incarnations.append(Incarnation(len(self.incarnations) + 1, worker.ps.pid, at_s))
        return worker

    async def wait_ready(self, limit_s: float = READY_LIMIT_S) -> None:
        """Until its /readyz answers 200: every loop of the process has started."""
        worker = self._worker()
        url = f"http://127.0.0.1:{worker.port}/readyz"
        deadline = asyncio.get_running_loop().time() + limit_s
        async with aiohttp.ClientSession() as session:
            while asyncio.get_running_loop().time() < deadline:
                if worker.process.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} worker exited with {worker.process.returncode} "
                        f"(see {self.log})"
                    )
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(url) as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.2)
        raise TimeoutError(f"{self.name} worker not ready after {limit_s:.0f}s (see {self.log})")

    async def kill(self, at_s: float) -> None:
        """SIGKILL, as a crash would; the process is reaped."""
        worker = self._worker()
        worker.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(worker.process.wait)
        self._ended(at_s, "SIGKILL")

    async def terminate(self, at_s: float) -> int:
        """SIGTERM, drained as a deployment stops it; its exit code (an exit code other than
        0, or a process that had to be killed, is reported as unexpected)."""
        worker = self._worker()
        await asyncio.to_thread(worker.stop)  # waits up to 30 s, then kills
        code = await asyncio.to_thread(worker.process.wait)  # reaped, if it was killed
        self._ended(at_s, f"SIGTERM, exit {code}")
        if code != 0:
            self.unexpected.append(f"{self.name} #{self.current.number} exited {code} on SIGTERM")
        return int(code)

    def exited_unasked(self, at_s: float) -> bool:
        """True (and recorded) when the current process has exited without being told to."""
        worker = self._worker()
        code = worker.process.poll()
        if code is None:
            return False
        self._ended(at_s, f"exited by itself, {code}")
        self.unexpected.append(
            f"{self.name} #{self.current.number} exited by itself with {code} "
            f"at {at_s / 60:.1f} min"
        )
        return True

    def sample_rss(self, at_s: float, *, steady: bool) -> None:
        """The current process's resident set, once it is ``SETTLE_S`` old (before, it is
        still importing: a few MiB that say nothing); ``steady`` when it is doing its
        steady work (an ingest process: caught up with the load)."""
        worker = self._worker()
        if at_s - self.current.started_s < SETTLE_S:
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            mib = worker.ps.memory_info().rss / (1 << 20)
            self.rss.append(RssSample(at_s, self.current.number, mib, steady))

    def _ended(self, at_s: float, how: str) -> None:
        self.current.ended_s = at_s
        self.current.end = how

    def _worker(self) -> WorkerRun:
        assert self.worker is not None, f"{self.name} was never started"
        return self.worker

    def kill_quietly(self) -> None:
        """For the way out after a failure: no process is left behind."""
        if self.worker is not None and self.worker.process.poll() is None:
            self.worker.process.kill()
            self.worker.process.wait()


async def gauges(worker: WorkerRun) -> dict[str, list[float]]:
    """The worker's values, per metric name, of ``chargeline_consumer_fetch_lag`` (one per
    partition, its own view), ``chargeline_consumer_lag`` (the lag monitor's, from the
    broker) and ``chargeline_events_total`` (one per topic, type and outcome)."""
    wanted = (
        "chargeline_consumer_fetch_lag",
        "chargeline_consumer_lag",
        "chargeline_events_total",
    )
    found: dict[str, list[float]] = {name: [] for name in wanted}
    url = f"http://127.0.0.1:{worker.port}/metrics"
    try:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            text = await response.text()
    except aiohttp.ClientError:
        return found
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in found:
                found[sample.name].append(sample.value)
    return found
