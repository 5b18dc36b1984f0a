"""Worker processes for the fault tests: spawn real `chargeline worker` OS processes, signal
them (SIGSTOP, SIGCONT, SIGKILL, SIGTERM), read their JSON logs, metrics and resident set,
and always leave none behind."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson
import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tests.faults.expected import Sent
from tests.support import settings_env, spawn_worker
from workers.devtools.devstack import free_port
from workers.kafka import client_options
from workers.settings import Settings

Position = tuple[str, int, int]  # topic, partition, offset


# The fault tests' session timeout, where it is not the point of the test: the broker holds
# a group join for about half of it (2 s here, 3 s at 6 s) and moves a killed member's
# partitions only after it, so every join and every SIGKILL costs less. Heartbeats go every
# quarter of it, so a busy machine still keeps its members.
SESSION_TIMEOUT_MS = 3000


def fault_settings(settings: Settings, **overrides: Any) -> Settings:
    """The test's settings with what every fault test wants: short back-offs (so recovery
    is quick once the fault is gone), JSON logs (so the test can read them) and a short
    session timeout (so joins and takeovers are quick)."""
    update: dict[str, Any] = {
        "retry_initial_ms": 50,
        "retry_max_ms": 1000,
        "log_format": "json",
        "batch_max_records": 500,
        "kafka_session_timeout_ms": SESSION_TIMEOUT_MS,
    }
    update.update(overrides)
    return settings.model_copy(update=update)


@contextlib.contextmanager
def frozen(postmaster: int) -> Iterator[None]:
    """The postmaster and every process it runs stopped (SIGSTOP), then continued, whatever
    happens: a Postgres that answers nothing, as a hung host or a dropped network does."""
    processes = [psutil.Process(postmaster), *psutil.Process(postmaster).children(True)]
    try:
        for process in processes:
            # A backend may exit between the listing and its signal: the others must
            # still be continued, whatever happens.
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGSTOP)
        yield
    finally:
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGCONT)


@dataclass
class Worker:
    """One `chargeline worker` process."""

    name: str
    kinds: tuple[str, ...]
    proc: subprocess.Popen[bytes]
    log_path: Path
    metrics_port: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, signum: signal.Signals) -> None:
        if self.alive:
            self.proc.send_signal(signum)

    def rss_bytes(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)

    def log(self, event: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines (all, or those of one event name) written so far."""
        lines: list[dict[str, Any]] = []
        with contextlib.suppress(FileNotFoundError), self.log_path.open("rb") as log:
            for line in log:
                with contextlib.suppress(orjson.JSONDecodeError):
                    entry = orjson.loads(line)
                    if isinstance(entry, dict) and (event is None or entry.get("event") == event):
                        lines.append(entry)
        return lines

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples matching ``labels``, scraped from /metrics now."""
        assert self.metrics_port is not None, "spawned without a metrics port"
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            sample, _, label_text = head.partition("{")
            if sample != name:
                continue
            found = dict(
                part.split("=", 1) for part in label_text.rstrip("}").split(",") if "=" in part
            )
            if all(found.get(k, "").strip('"') == v for k, v in labels.items()):
                total += float(value)
        return total

    def ready(self) -> bool:
        """/readyz answers 200 (its loops are running)."""
        assert self.metrics_port is not None, "spawned without a metrics port"
        url = f"http://127.0.0.1:{self.metrics_port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def assigned(self) -> set[str]:
        """Partitions this worker holds according to its log (assigned minus revoked)."""
        held: set[str] = set()
        for entry in self.log():
            if entry.get("event") == "partitions_revoked":
                held -= set(entry.get("partitions", []))
            elif entry.get("event") == "partitions_assigned":
                held |= set(entry.get("partitions", []))
        return held


@dataclass
class Workers:
    """The worker processes of one test; :meth:`stop_all` ends every one of them."""

    settings: Settings
    directory: Path
    workers: list[Worker] = field(default_factory=list)
    spawned: int = 0

    def spawn(self, *kinds: str, metrics: bool = False, **overrides: Any) -> Worker:
        self.spawned += 1
        name = f"w{self.spawned}"
        port = free_port() if metrics else None
        settings = self.settings.model_copy(update=overrides)
        env = settings_env(settings)
        if port is not None:
            env |= {"CHARGELINE_METRICS_PORT": str(port), "CHARGELINE_METRICS_HOST": "127.0.0.1"}
        log_path = self.directory / f"{name}.log"
        proc = spawn_worker(env, *kinds, log_path=str(log_path))
        worker = Worker(name, kinds, proc, log_path, port)
        self.workers.append(worker)
        return worker

    @property
    def running(self) -> list[Worker]:
        return [w for w in self.workers if w.alive]

    def stop(self, worker: Worker, *, timeout: float = 40) -> float:
        """SIGTERM (after SIGCONT, a stopped process cannot act on it); SIGKILL if it does not
        exit in time. Returns the seconds it took."""
        started = time.monotonic()
        worker.signal(signal.SIGCONT)
        worker.signal(signal.SIGTERM)
        try:
            worker.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            worker.proc.kill()
            worker.proc.wait()
        return time.monotonic() - started

    def kill(self, worker: Worker) -> None:
        worker.signal(signal.SIGKILL)
        worker.proc.wait(timeout=10)

    def stop_all(self, *, within: float = 20) -> None:
        """SIGTERM every running worker at once; SIGKILL those still running ``within``
        seconds later (the test's checks are done: this is cleanup), and say so."""
        for worker in self.running:
            worker.signal(signal.SIGCONT)
            worker.signal(signal.SIGTERM)
        deadline = time.monotonic() + within
        for worker in self.workers:
            try:
                worker.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait()
                print(f"teardown: {worker.name} still running {within:.0f}s after SIGTERM, killed")


@contextlib.contextmanager
def workers(settings: Settings, directory: Path) -> Iterator[Workers]:
    group = Workers(settings, directory)
    try:
        yield group
    finally:
        group.stop_all()


async def wait_until(condition: Any, *, timeout: float, what: str, every: float = 0.2) -> float:
    """Poll a sync or async ``condition`` until it holds; return the seconds it took."""
    started = time.monotonic()
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(every)


class Producer:
    """One producer kept open for a test's slices (acks=all, all records acknowledged)."""

    def __init__(self, settings: Settings, *, max_request_size: int = 1 << 20) -> None:
        self.producer = AIOKafkaProducer(
            client_id="fault-test",
            acks="all",
            enable_idempotence=settings.kafka_idempotent_producer,
            linger_ms=5,
            max_request_size=max_request_size,
            **client_options(settings),
        )

    async def __aenter__(self) -> Producer:
        await self.producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.producer.stop()

    async def publish(self, settings: Settings, items: Sequence[Sent]) -> list[Position]:
        """Send ``items`` in order to their topics, wait for every acknowledgement; return
        where each one landed."""
        topics = {"charges": settings.topic_charges, "usage": settings.topic_usage}
        futures = [
            await self.producer.send(topics[item.topic], value=item.value, key=item.key)
            for item in items
        ]
        landed = await asyncio.gather(*futures)
        return [(meta.topic, meta.partition, meta.offset) for meta in landed]


async def commit_group_offsets(settings: Settings, topics: list[str], offset: int) -> int:
    """Commit ``offset`` for every partition of ``topics`` in the live consumer group, as an
    operator's offset reset does (the group's workers stopped). Joins the group as a member:
    Tansu refuses commits from outside it. Returns the number of partitions reset."""
    consumer = AIOKafkaConsumer(
        *topics,
        group_id=settings.consumer_group,
        enable_auto_commit=False,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        **client_options(settings),
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + 30
        wanted = sum(len(consumer.partitions_for_topic(t) or ()) for t in topics)
        while len(consumer.assignment()) < wanted or not wanted:
            assert time.monotonic() < deadline, "never got the partitions"
            await consumer.getmany(timeout_ms=200)
            wanted = sum(len(consumer.partitions_for_topic(t) or ()) for t in topics)
        await consumer.commit(dict.fromkeys(consumer.assignment(), offset))
        committed = {tp: await consumer.committed(tp) for tp in consumer.assignment()}
        assert set(committed.values()) == {offset}, committed
        return len(committed)
    finally:
        await consumer.stop()


async def committed_offsets(settings: Settings, topics: list[str]) -> dict[TopicPartition, int]:
    """The live group's committed offsets (-1 where nothing is committed), read without joining."""
    consumer = AIOKafkaConsumer(
        group_id=settings.consumer_group, enable_auto_commit=False, **client_options(settings)
    )
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        result: dict[TopicPartition, int] = {}
        for topic in topics:
            for partition in sorted(consumer.partitions_for_topic(topic) or ()):
                tp = TopicPartition(topic, partition)
                committed = await consumer.committed(tp)
                result[tp] = -1 if committed is None else committed
        return result
    finally:
        await consumer.stop()


async def topic_records(
    settings: Settings, topic: str, *, expected: int, timeout: float
) -> list[Any]:
    """Every record on ``topic`` from the beginning: stops once ``expected`` were read and no
    more arrive for a second (so duplicates beyond ``expected`` are counted too)."""
    consumer = AIOKafkaConsumer(
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_bytes=64 << 20,
        max_partition_fetch_bytes=8 << 20,
        **client_options(settings),
    )
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        deadline = time.monotonic() + timeout
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            got = [r for tp_records in batch.values() for r in tp_records]
            records.extend(got)
            if got:
                quiet_since = time.monotonic()
            elif len(records) >= expected and time.monotonic() - quiet_since > 1:
                break
        return records
    finally:
        await consumer.stop()


async def publish_paced(
    producer: Producer, settings: Settings, items: Sequence[Sent], *, seconds: float, slices: int
) -> int:
    """Publish ``items`` in order, in ``slices`` parts spread over about ``seconds``."""
    step = max(1, -(-len(items) // slices))
    for start in range(0, len(items), step):
        await producer.publish(settings, items[start : start + step])
        await asyncio.sleep(seconds / slices)
    return len(items)


def backend_ports(settings: Settings, worker: Worker) -> list[int]:
    """The worker's client ports of its Postgres connections (pg_stat_activity.client_port)."""
    port = urlsplit(settings.dsn).port or 5432
    try:
        connections = psutil.Process(worker.pid).net_connections(kind="tcp")
    except psutil.Error:
        return []
    return [c.laddr.port for c in connections if c.raddr and c.raddr.port == port]


async def signal_in_transaction(
    settings: Settings, worker: Worker, signum: signal.Signals, *, within: float
) -> str:
    """Send ``signum`` to ``worker`` inside a database transaction of its own if one is
    caught within ``within`` seconds (polled every few milliseconds), else at the end of
    that time; say where it was caught."""
    conn = await asyncpg.connect(settings.dsn)
    try:
        deadline = time.monotonic() + within
        ports = backend_ports(settings, worker)
        polls = 0
        while time.monotonic() < deadline:
            polls += 1
            if polls % 200 == 0:
                ports = backend_ports(settings, worker)
            state = await conn.fetchval(
                "SELECT state FROM pg_stat_activity WHERE client_port = ANY($1::int[]) "
                "AND state IN ('active', 'idle in transaction') LIMIT 1",
                ports,
            )
            if state is not None:
                worker.signal(signum)
                return f"inside its transaction ({state})"
            await asyncio.sleep(0.002)
        worker.signal(signum)
        return "between transactions"
    finally:
        await conn.close()
