"""``chargeline worker --processes N``: N worker processes on one host, one event loop and one
consumer-group member each, so that ingestion uses more than one core.

The first process runs every kind asked for; the others run only the ingest kinds among them
(``charges``, ``usage``): more relays, monitors or periodic workers would add nothing but
standbys. Each child serves its own ``/metrics`` on ``CHARGELINE_METRICS_PORT + i`` (0 keeps
them all off). SIGTERM or SIGINT to the parent goes to every child, each drains its batch in
flight as a single worker does, and the parent returns once all have exited. A child that
exits on its own ends the others too, and the parent exits non-zero: the orchestrator
restarts the whole set, as it would a single worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence

from workers.errors import UsageError
from workers.kinds import INGEST_KINDS
from workers.logs import get_logger
from workers.settings import MAX_PORT, Settings

log = get_logger("chargeline.supervisor")

_EXTRA_WAIT_S = 10.0  # beyond a child's own shutdown timeout, before it is killed


def layout(kinds: Sequence[str], processes: int) -> list[tuple[str, ...]]:
    """The kinds of each process: all of ``kinds`` first, then only their ingest kinds."""
    ingest = tuple(kind for kind in INGEST_KINDS if kind in kinds or "all" in kinds)
    if processes > 1 and not ingest:
        raise UsageError("--processes above 1 needs an ingest kind (all, charges or usage)")
    return [tuple(kinds), *[ingest] * (processes - 1)]


def metrics_ports(settings: Settings, processes: int) -> list[int]:
    """Process n serves /metrics on CHARGELINE_METRICS_PORT + n (0: none serves it)."""
    if not settings.metrics_port:
        return [0] * processes
    last = settings.metrics_port + processes - 1
    if last > MAX_PORT:
        raise UsageError(
            f"--processes {processes} needs metrics ports {settings.metrics_port}-{last}; "
            f"set CHARGELINE_METRICS_PORT to {MAX_PORT - processes + 1} or lower"
        )
    return [settings.metrics_port + number for number in range(processes)]


async def supervise(settings: Settings, kinds: Sequence[str], processes: int) -> int:
    plan = layout(kinds, processes)
    ports = metrics_ports(settings, processes)
    failed: list[tuple[int, int | None]] = []
    children: list[asyncio.subprocess.Process] = []
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    try:
        for number, (child_kinds, port) in enumerate(zip(plan, ports, strict=True)):
            env = {**os.environ, **settings.model_copy(update={"metrics_port": port}).as_env()}
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "workers.cli.main", "worker", *child_kinds, env=env
            )
            children.append(child)
            log.info(
                "worker_process_started", process=number, pid=child.pid, kinds=list(child_kinds),
                metrics_port=port,
            )  # fmt: skip
        exits = [asyncio.ensure_future(child.wait()) for child in children]
        stop = asyncio.ensure_future(stopping.wait())
        await asyncio.wait([*exits, stop], return_when=asyncio.FIRST_COMPLETED)
        failed = [
            (number, child.returncode)
            for number, child in enumerate(children)
            if child.returncode is not None
        ]
        if failed and not stopping.is_set():
            log.error("worker_process_exited", processes=dict(failed))
        stop.cancel()
    finally:
        await _stop_all(children, settings.shutdown_timeout_s + _EXTRA_WAIT_S)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    codes = [child.returncode for child in children]
    log.info("worker_processes_stopped", exit_codes=codes)
    if stopping.is_set() and not failed:
        return 0
    return next((code for code in codes if code), 1)


async def _stop_all(children: list[asyncio.subprocess.Process], timeout_s: float) -> None:
    """SIGTERM to every child still running; SIGKILL to any still there after ``timeout_s``."""
    for child in children:
        if child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.terminate()
    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*(child.wait() for child in children))
    except TimeoutError:
        for child in children:
            if child.returncode is None:
                log.warning("worker_process_killed", pid=child.pid)
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
        await asyncio.gather(*(child.wait() for child in children))
