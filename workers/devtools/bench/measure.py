"""What the bench reads besides event counts: CPU per process, the machine's speed, and
quantiles of the worker's latency histogram.

CPU is read from the OS by process id, so that each figure is the process's own and not
the machine's; the machine's busy and stolen shares are read alongside, because on a
shared VM they say how much of a phase's time the bench had at all.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

import psutil

from workers.devtools.bench.worker import WorkerRun

if TYPE_CHECKING:
    from workers.devtools.devstack import LocalStack

MACHINE_TIMES = ("machine", "machine_busy", "machine_steal")


def python_loop_seconds(iterations: int = 5_000_000) -> float:
    """Seconds for a fixed pure-Python loop, best of three: how fast this machine runs Python
    today. A shared machine's speed moves from one day to the next, so figures of runs on
    different days compare only after scaling by it."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        total = 0
        for n in range(iterations):
            total += n
        best = min(best, time.perf_counter() - started)
    return best


def server_pids(stack: LocalStack) -> dict[str, int]:
    """The embedded stack's servers by name, as the pid each runs as: the servers whose CPU
    the bench measures, since this run owns them."""
    pids = {"postgres": stack.postgres.pid, "broker": stack.broker.pid}
    return {server: pid for server, pid in pids.items() if pid is not None}


def server_cpu_seconds(servers: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each server in ``servers`` (name -> the pid it runs as):
    that process and all its descendants, and the children it has reaped.

    The reaped count because autovacuum workers live for one table each: once the
    postmaster has reaped one, its CPU shows only in the postmaster's children times. Only
    the bench's own servers are counted, not other servers of the same kind on the machine.
    """
    totals: dict[str, float] = {}
    for server, pid in servers.items():
        total = 0.0
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(pid)
            for process in (root, *root.children(recursive=True)):
                with contextlib.suppress(psutil.NoSuchProcess):  # gone meanwhile: reaped
                    times = process.cpu_times()
                    total += times.user + times.system
                    total += times.children_user + times.children_system
        totals[server] = total
    return totals


def cpu_seconds_by_process(worker: WorkerRun, servers: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far by the worker, the ``servers``, this process (which
    generates the fixed-rate load) and the whole machine, summed over its CPUs: all its time
    (``machine``), the busy part, and the part stolen (the hypervisor gave this VM's CPUs
    to someone else)."""
    own = psutil.Process().cpu_times()
    machine = psutil.cpu_times()
    # guest time is counted in user time already (Linux); the other fields are not there
    # on every platform.
    total = sum(machine) - getattr(machine, "guest", 0.0) - getattr(machine, "guest_nice", 0.0)
    return {
        "worker": worker.cpu_seconds(),
        **server_cpu_seconds(servers),
        "load_generator": own.user + own.system,
        "machine": total,
        "machine_busy": total - machine.idle - getattr(machine, "iowait", 0.0),
        "machine_steal": getattr(machine, "steal", 0.0),
    }


def cpu_spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds used between two ``cpu_seconds_by_process`` readings."""
    return {name: after[name] - before[name] for name in before}


def machine_share_pct(spent: dict[str, float], part: str) -> float:
    """``part`` (``machine_busy``, ``machine_steal``) as a share of the machine's time."""
    return 100 * spent[part] / spent["machine"] if spent["machine"] > 0 else 0.0


def cpu_cores_between(
    before: dict[str, float], after: dict[str, float], seconds: float
) -> dict[str, float]:
    """Cores each process kept busy between two ``cpu_seconds_by_process`` readings, and
    the share of the machine's CPU time that was busy (``machine_busy_pct``)."""
    spent = cpu_spent(before, after)
    cores = {
        name: value / seconds
        for name, value in spent.items()
        if name not in MACHINE_TIMES and seconds > 0
    }
    cores["machine_busy_pct"] = machine_share_pct(spent, "machine_busy")
    return cores


def histogram_quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus's histogram_quantile over cumulative buckets: linear within a bucket."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total == 0:
        return float("nan")
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            width = count - lower_count
            return lower_bound + (bound - lower_bound) * (
                (rank - lower_count) / width if width else 1
            )
        lower_bound, lower_count = bound, count
    return bounds[-2]


def histogram_since(before: dict[float, float], after: dict[float, float]) -> dict[float, float]:
    """The cumulative buckets of the observations made between two readings of a histogram,
    so that a phase's quantiles leave out what the worker saw before it."""
    return {le: after[le] - before.get(le, 0.0) for le in after}
