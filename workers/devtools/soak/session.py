"""The soak while it runs: its clock, its two worker roles, the load it sends, the crashes
and the relay's restart on schedule, and what it reads every 10 s."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from pathlib import Path
from typing import Any

import asyncpg
import psutil
from rich.console import Console

from workers.devtools.bench.load import PARTITIONS, Planned, send_at_rate
from workers.devtools.bench.measure import cpu_seconds_by_process, histogram_since
from workers.devtools.soak.figures import (
    CpuSample,
    Interval,
    crash_times,
    relay_restart_time,
    sample_times,
)
from workers.devtools.soak.fleet import INGEST_KINDS, RELAY_KINDS, Role, gauges
from workers.devtools.soak.load import CHUNK_S, SEND_TICK_S, soak_chunk
from workers.devtools.soak.readings import outbox_backlog, verify_once
from workers.kafka import make_producer
from workers.settings import Settings

console = Console(stderr=True)

CAUGHT_UP_S = 2.0  # caught up: less than 2 s of load behind, over all partitions
END_LIMIT_S = 300.0  # at the end: to apply the rest, and to publish the outbox
# verify runs every minute (the verify worker's default is every five), each checking what
# came after the last: the first (under load) is the start's figure, the one after the load
# the end's; flat when the end takes no longer than the start for as much new traffic.
VERIFY_EVERY_S = 60.0


class Soak:
    """The run's state: its clock, the two worker roles, and what it has read so far."""

    def __init__(
        self,
        settings: Settings,
        workdir: Path,
        *,
        rate: float,
        duration_s: float,
        crash_every_s: float,
        window_s: float,
        customers: int,
        run: str,
        servers: dict[str, int],
    ) -> None:
        self.settings = settings
        self.workdir = workdir
        self.rate = rate
        self.duration_s = duration_s
        self.crash_every_s = crash_every_s
        self.window_s = window_s
        self.customers = customers
        self.run = run
        self.servers = servers  # the embedded stack's, by name: their CPU is read
        self.broker = psutil.Process(servers["broker"]) if "broker" in servers else None
        self.cpu: list[CpuSample] = []
        self.ingest = Role("ingest", INGEST_KINDS, settings, workdir / "ingest.log")
        self.relay = Role("relay", RELAY_KINDS, settings, workdir / "relay.log")
        self.lock = asyncio.Lock()  # one action on the processes at a time
        self.started = 0.0
        self.intervals: list[Interval] = []
        self.last_buckets: dict[float, float] = {}
        self.last_scrape_s = 0.0
        self.outbox_backlog: list[tuple[float, int, float]] = []  # (at, rows, oldest age)
        self.broker_rss: list[tuple[float, float]] = []
        self.crashes: list[dict[str, Any]] = []
        self.relay_restart: dict[str, Any] = {}
        self.verify: dict[str, Any] = {}
        self.sent = {"records": 0, "seconds": 0.0}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.chunk_records = math.ceil(rate * CHUNK_S)
        self.chunk_started, self.chunk_len = 0.0, 0  # the chunk being sent
        self.first_chunk: list[Planned] = []

    def now(self) -> float:
        return time.monotonic() - self.started

    async def sleep_until(self, at_s: float) -> None:
        await asyncio.sleep(max(0.0, at_s - self.now()))

    def spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- the processes -------------------------------------------------------------------

    async def start(self) -> None:
        """Both processes started and ready, the first chunk of load planned: the clock
        starts."""
        self.relay.start(0.0)
        self.ingest.start(0.0)
        self.first_chunk = await asyncio.to_thread(self.plan, 0)
        await asyncio.gather(self.relay.wait_ready(), self.ingest.wait_ready())
        self.started = time.monotonic()
        self.read_cpu(0.0)
        self.spawn(self.watch_recovery())

    async def start_ingest(self, at_s: float) -> None:
        """A new ingest process, as an orchestrator starts one after a crash."""
        self.ingest.start(at_s)
        self.last_buckets, self.last_scrape_s = {}, at_s
        self.spawn(self.watch_recovery())

    def sent_so_far(self) -> float:
        """Records sent until now: the chunks sent, and the part of the one being sent that
        is due (``send_at_rate`` sends them on that schedule)."""
        due = int((time.monotonic() - self.chunk_started) * self.rate)
        return self.sent["records"] + min(self.chunk_len, due)

    def behind(self) -> float:
        """Records sent but not yet applied: the load sent so far, less what every ingest
        process has counted (``chargeline_events_total``, counted once a batch's offsets
        are committed; a re-read after a crash is counted by the process that re-reads it).
        The worker's own ``chargeline_consumer_fetch_lag`` cannot tell: it holds the high
        watermark of the worker's last fetch, and a worker catching up fetches only as
        fast as its batches commit."""
        return self.sent_so_far() - sum(i.events for i in self.ingest.incarnations)

    async def watch_recovery(self) -> None:
        """When the current ingest process starts applying records, and when it has caught
        up: less than ``CAUGHT_UP_S`` of load behind, with a batch's worth to spare (a kill
        between a batch's offset commit and its count leaves one batch uncounted). Until then
        its observations are recovery, not steady."""
        incarnation, worker = self.ingest.current, self.ingest.worker
        assert worker is not None
        slack = self.rate * CAUGHT_UP_S + self.settings.batch_max_records
        while self.ingest.current is incarnation and incarnation.ended_s is None:
            events = sum((await gauges(worker))["chargeline_events_total"])
            incarnation.events = max(incarnation.events, events)
            if incarnation.consuming_s is None and events > 0:
                incarnation.consuming_s = self.now()
            if incarnation.consuming_s is not None and self.behind() <= slack:
                incarnation.caught_up_s = self.now()
                return
            await asyncio.sleep(1.0)

    async def scrape_lag(self, at_s: float) -> None:
        """The ingest process's latency observations since its last scrape, as an interval;
        steady when the process had caught up before the interval began."""
        worker, incarnation = self.ingest.worker, self.ingest.current
        assert worker is not None
        metrics = await worker.metrics()
        if not metrics:  # not answering yet (starting): the next scrape covers the span
            return
        buckets = metrics["lag_buckets"]
        incarnation.events = max(incarnation.events, metrics["events"])
        steady = incarnation.caught_up_s is not None and incarnation.caught_up_s <= (
            self.last_scrape_s
        )
        self.intervals.append(
            Interval(at_s, histogram_since(self.last_buckets, buckets), steady=steady)
        )
        self.last_buckets, self.last_scrape_s = buckets, at_s

    def read_cpu(self, at_s: float) -> None:
        worker = self.ingest.worker
        assert worker is not None
        with contextlib.suppress(psutil.NoSuchProcess):
            seconds = cpu_seconds_by_process(worker, self.servers)
            self.cpu.append(CpuSample(at_s, self.ingest.current.number, seconds))

    async def crash(self, at_s: float) -> None:
        async with self.lock:
            await self.scrape_lag(at_s)  # what the process saw up to now, not lost
            self.read_cpu(at_s)
            old = self.ingest.current.pid
            await self.ingest.kill(at_s)
            await self.start_ingest(at_s)
            self.crashes.append(
                {"at_min": at_s / 60, "killed_pid": old, "incarnation": self.ingest.current.number}
            )
        console.print(f"  {at_s / 60:5.1f} min: ingest process SIGKILLed and started again")

    async def restart_relay(self, at_s: float) -> None:
        async with self.lock:
            code = await self.relay.terminate(at_s)
            self.relay.start(self.now())
        await self.relay.wait_ready()
        self.relay_restart = {
            "at_min": at_s / 60,
            "exit_code": code,
            "down_s": self.now() - at_s,
        }
        console.print(f"  {at_s / 60:5.1f} min: outbox relay SIGTERMed (exit {code}), started")

    async def sample(self, conn: asyncpg.Connection, at_s: float) -> None:
        """Every 10 s: both processes' RSS, the ingest process's histogram, the outbox."""
        async with self.lock:
            for role in (self.ingest, self.relay):
                if role.exited_unasked(at_s):
                    console.print(f"[red]{role.unexpected[-1]}: started again[/red]")
                    if role is self.ingest:
                        await self.start_ingest(at_s)
                    else:
                        role.start(at_s)
                    continue
                role.sample_rss(
                    at_s, steady=role.current.caught_up_s is not None or role is self.relay
                )
            await self.scrape_lag(at_s)
            self.read_cpu(at_s)
        self.outbox_backlog.append((at_s, *await outbox_backlog(conn)))
        if self.broker is not None:
            self.broker_rss.append((at_s, self.broker.memory_info().rss / (1 << 20)))

    # -- the phases of the run -------------------------------------------------------------

    async def send(self) -> None:
        """The load at ``rate`` until the run's end, chunk by chunk, the next chunk planned
        in a thread while this one is sent."""
        producer = make_producer(self.settings, client_id="chargeline-soak")
        await producer.start()
        k, planned = 0, self.first_chunk
        planning: asyncio.Task[list[Planned]] | None = None
        try:
            previous: list[asyncio.Future[Any]] = []
            while (left := self.duration_s - self.now()) > 0.05:
                if planning is not None:
                    planned = await planning
                k += 1
                planning = asyncio.create_task(asyncio.to_thread(self.plan, k))
                self.chunk_started, self.chunk_len = time.monotonic(), len(planned)
                count, seconds, _, acks = await send_at_rate(
                    producer, planned, self.rate, min(CHUNK_S, left), tick_s=SEND_TICK_S,
                    stamp_due=False,  # the soak's coarse tick is for the broker, not a linger
                )  # fmt: skip
                self.sent["records"] += count
                self.sent["seconds"] += seconds
                self.chunk_len = 0
                await asyncio.gather(*previous)  # long acknowledged by now
                previous = acks
            await asyncio.gather(*previous)
        finally:
            if planning is not None:
                planning.cancel()
            await producer.stop()

    def plan(self, chunk: int) -> list[Planned]:
        """Chunk ``chunk`` of the load, its references its own."""
        topics = {"usage": self.settings.topic_usage, "charges": self.settings.topic_charges}
        return soak_chunk(self.chunk_records, self.customers, f"{self.run}s{chunk}-", topics)

    async def sampler(self, conn: asyncpg.Connection) -> None:
        for at_s in sample_times(self.duration_s):
            await self.sleep_until(at_s)
            await self.sample(conn, at_s)

    async def schedule(self) -> None:
        events: list[tuple[float, str]] = [(at, "crash") for at in crash_times(
            self.duration_s, self.crash_every_s
        )]  # fmt: skip
        events.append((relay_restart_time(self.duration_s, self.crash_every_s), "relay"))
        for at_s, what in sorted(events):
            await self.sleep_until(at_s)
            if what == "crash":
                await self.crash(at_s)
            else:
                await self.restart_relay(at_s)

    async def verifier(self) -> None:
        """verify every minute of the load, one run at a time: a run still going at the
        next minute's mark takes that minute's place (the next starts at the mark after)."""
        every = min(VERIFY_EVERY_S, self.duration_s / 2)
        at_s = every
        while at_s < self.duration_s:
            await self.sleep_until(at_s)
            await self.run_verify("during" if "runs" in self.verify else "start")
            at_s = every * (math.floor(self.now() / every) + 1)

    async def run_verify(self, label: str) -> None:
        """One ``chargeline verify``: its figures under ``label`` (the first of each), every
        run's in ``verify["runs"]``."""
        at_s = self.now()
        run = {"at_min": at_s / 60, **await verify_once(self.settings)}
        self.verify.setdefault(label, run)
        self.verify.setdefault("runs", []).append({"label": label, **run})
        verdict = "ok" if run["ok"] else "FAILED"
        console.print(
            f"  verify ({label}): {verdict} in {run['wall_s']:.1f}s,"
            f" {run['entries']:,} ledger entries since the last"
        )

    async def finish(self, conn: asyncpg.Connection) -> dict[str, Any]:
        """After the load: what the outbox held as it stopped; then everything applied and
        published, both processes SIGTERMed, and verify on the quiet database."""
        figures: dict[str, Any] = {}
        unpublished, age_s = await outbox_backlog(conn)
        total = await conn.fetchval("SELECT count(*) FROM outbox")
        figures["outbox_end"] = {
            "total": int(total),
            "unpublished": unpublished,
            "oldest_unpublished_age_s": age_s,
        }
        started = time.monotonic()
        while time.monotonic() - started < END_LIMIT_S:  # every record applied
            worker = self.ingest.worker
            assert worker is not None
            lags = (await gauges(worker))["chargeline_consumer_fetch_lag"]
            if len(lags) >= 2 * PARTITIONS and sum(lags) == 0:
                break
            await asyncio.sleep(0.5)
        figures["end_apply_s"] = time.monotonic() - started
        async with self.lock:
            await self.scrape_lag(self.now())  # the last window's last records
        started = time.monotonic()
        while time.monotonic() - started < END_LIMIT_S:  # every outbox row published
            if not await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL"):
                break
            await asyncio.sleep(0.5)
        figures["end_publish_s"] = time.monotonic() - started
        async with self.lock:
            end_s = self.now()
            for role in (self.ingest, self.relay):
                if not role.exited_unasked(end_s):
                    await role.terminate(end_s)
        await asyncio.gather(*self.tasks)
        await self.run_verify("end")
        return figures
