"""The soak's arithmetic, apart from any process or server: when things happen, latency per
window from the worker's histogram, the resident set's levels, and the acceptance checks.

Everything here is a pure function of what the run recorded, so the unit tests check it
on made-up records (``tests/unit/test_soak.py``).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from workers.devtools.bench.measure import histogram_quantile

SAMPLE_S = 10.0  # RSS, the latency histogram and the outbox are read every 10 s
WINDOW_MAX_S = 300.0  # latency windows of 5 minutes at most
EARLY_S = 300.0  # "after the first 5 minutes": the level RSS at the end is held against
LEVEL_SPAN_S = 60.0  # a level is the median of the samples of the last minute
RSS_GROWTH_LIMIT = 0.10  # RSS at the end at most 10% above its early level
FLAT_FACTOR = 2.0  # flat: the largest window p99 under twice the median window p99
WINDOW_MIN_RECORDS = 1_000  # a window with fewer steady records is left out of that rule
OUTBOX_AGE_LIMIT_S = 60.0  # no unpublished outbox row older than this at the end


# -- the schedule ---------------------------------------------------------------------


def window_seconds(crash_every_s: float, window_s: float | None = None) -> float:
    """The latency window: as asked, else the crash period (at most 5 minutes), so that each
    window holds one crash and the windows compare."""
    if window_s is not None:
        return window_s
    return min(WINDOW_MAX_S, crash_every_s) if crash_every_s > 0 else WINDOW_MAX_S


def crash_times(duration_s: float, every_s: float) -> list[float]:
    """When the ingest process is SIGKILLed: in the middle of each period, (k + 1/2) x
    ``every_s``, so that with windows of one period every window holds one crash and its
    recovery, and no crash falls on a window's edge. None when ``every_s`` is 0."""
    if every_s <= 0:
        return []
    times = []
    at = every_s / 2
    while at < duration_s:
        times.append(at)
        at += every_s
    return times


def relay_restart_time(duration_s: float, every_s: float) -> float:
    """When the relay alone is restarted, once: the first whole crash period at or after
    the middle of the run, halfway between two crashes (the middle itself without
    crashes)."""
    middle = duration_s / 2
    if every_s <= 0:
        return middle
    at = math.ceil(middle / every_s) * every_s
    if at >= duration_s:
        at = math.floor(middle / every_s) * every_s
    if at <= 0:  # a run shorter than two periods: clear of its crash
        at = middle
        if any(abs(at - crash) < every_s / 4 for crash in crash_times(duration_s, every_s)):
            at += every_s / 4
    return at


def early_time(duration_s: float, window_s: float) -> float:
    """The moment of "after the first 5 minutes": 5 minutes, on a window's edge, or half
    the run when the run is shorter than 10 minutes. On a window's edge, when crashes are
    in the middle of the windows, the process alive then is as old as the one alive at the
    end, so their sizes compare."""
    target = min(EARLY_S, duration_s / 2)
    at = math.floor(target / window_s) * window_s
    return at if at > 0 else target


def sample_times(duration_s: float, every_s: float = SAMPLE_S) -> list[float]:
    """The sampling grid, from the load's start: every ``every_s`` up to and including the
    end, so that every window's edge is a sample time and no interval between two samples
    straddles two windows."""
    count = math.floor(duration_s / every_s + 1e-9)
    times = [every_s * k for k in range(1, count + 1)]
    if not times or times[-1] < duration_s:
        times.append(duration_s)
    return times


# -- latency per window ---------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """The worker's lag observations between two scrapes of one process incarnation."""

    end_s: float  # the later scrape, in seconds since the load started
    buckets: dict[float, float]  # cumulative buckets (le -> count) of those observations
    steady: bool  # outside every crash's recovery (see ``run.py``)


def add_buckets(a: dict[float, float], b: dict[float, float]) -> dict[float, float]:
    """Two sets of cumulative buckets of the same histogram, added: the observations of
    both (cumulative counts add bound by bound)."""
    return {le: a.get(le, 0.0) + b.get(le, 0.0) for le in a.keys() | b.keys()}


def window_of(at_s: float, window_s: float, windows: int) -> int:
    """The window an interval ending at ``at_s`` belongs to: window k is (k W, (k + 1) W];
    anything after the last window's end (the catch-up after the load stopped) is the last
    window's, as those records were sent in it."""
    return min(windows - 1, max(0, math.ceil(at_s / window_s - 1e-9) - 1))


def records_in(buckets: dict[float, float]) -> float:
    return buckets.get(math.inf, 0.0)


def quantile_ms(q: float, buckets: dict[float, float]) -> float:
    if not buckets or records_in(buckets) <= 0:
        return math.nan
    return histogram_quantile(q, buckets) * 1000


def p99_ms(buckets: dict[float, float]) -> float:
    return quantile_ms(0.99, buckets)


def latency_windows(
    intervals: Iterable[Interval], window_s: float, duration_s: float
) -> list[dict[str, Any]]:
    """p99 end-to-end latency per window, from the worker's histogram.

    Each scrape's observations since the previous scrape of the same process (an
    incarnation starts from zero) are added to the window the scrape closes, so restarts
    lose nothing but what a killed process observed after its last scrape (the soak scrapes
    it just before the kill). ``p99_ms`` covers every record committed in the window, the
    re-reads and backlog after a crash included; ``steady_p99_ms`` only the intervals
    outside the recoveries.
    """
    windows = max(1, math.ceil(duration_s / window_s - 1e-9))
    every: list[dict[float, float]] = [{} for _ in range(windows)]
    steady: list[dict[float, float]] = [{} for _ in range(windows)]
    for interval in intervals:
        k = window_of(interval.end_s, window_s, windows)
        every[k] = add_buckets(every[k], interval.buckets)
        if interval.steady:
            steady[k] = add_buckets(steady[k], interval.buckets)
    return [
        {
            "window": k + 1,
            "from_min": k * window_s / 60,
            "to_min": min(duration_s, (k + 1) * window_s) / 60,
            "records": records_in(every[k]),
            "p99_ms": p99_ms(every[k]),
            "steady_records": records_in(steady[k]),
            "steady_p50_ms": quantile_ms(0.5, steady[k]),
            "steady_p99_ms": p99_ms(steady[k]),
        }
        for k in range(windows)
    ]


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds used so far (``cpu_seconds_by_process``): ``worker`` is the ingest
    process ``incarnation``'s own, from its start."""

    at_s: float
    incarnation: int
    seconds: dict[str, float]


def window_cores(
    samples: Sequence[CpuSample], window_s: float, duration_s: float
) -> list[dict[str, float]]:
    """Cores each process kept busy per window, and the machine's busy share: the latency
    figures' context. Between two samples of different ingest processes, the worker's is
    the new process's CPU since its start (the killed one's last seconds are not counted)."""
    windows = max(1, math.ceil(duration_s / window_s - 1e-9))
    spent: list[dict[str, float]] = [{} for _ in range(windows)]
    for before, after in itertools.pairwise(samples):
        if after.at_s > duration_s + 1e-9:
            break
        k = window_of(after.at_s, window_s, windows)
        for name, value in after.seconds.items():
            if name == "worker" and after.incarnation != before.incarnation:
                used = value
            else:
                used = value - before.seconds.get(name, value)
            spent[k][name] = spent[k].get(name, 0.0) + used
    cores = []
    for k, window_spent in enumerate(spent):
        length = min(duration_s, (k + 1) * window_s) - k * window_s
        row = {
            name: value / length
            for name, value in window_spent.items()
            if name not in ("machine", "machine_busy", "machine_steal")
        }
        if window_spent.get("machine"):
            row["machine_busy_pct"] = 100 * window_spent["machine_busy"] / window_spent["machine"]
        cores.append(row)
    return cores


@dataclass(frozen=True)
class Flatness:
    flat: bool
    largest_ms: float
    median_ms: float
    windows: int  # the windows the rule covered
    note: str


def flatness(
    windows: Sequence[dict[str, Any]],
    *,
    factor: float = FLAT_FACTOR,
    min_records: float = WINDOW_MIN_RECORDS,
) -> Flatness:
    """The steady p99 is flat when every window was steady for a while (at least
    ``min_records`` steady records: the worker caught up after its crash) and the largest
    window's p99 is under ``factor`` times the median of the windows'. A window with fewer
    than ``min_records`` records at all is left out (a handful of records has no p99); a
    window that had records but never steady ones is a miss, not a gap (the worker never
    caught up in it). Fewer than two windows cannot show a trend: missed too."""
    counted = [w for w in windows if w["records"] >= min_records]
    never = [w for w in counted if w["steady_records"] < min_records]
    values = [w["steady_p99_ms"] for w in counted if w not in never]
    notes = []
    if never:
        notes.append(
            f"{len(never)} window(s) never steady (the worker had not caught up): "
            + ", ".join(f"{w['from_min']:g}-{w['to_min']:g} min" for w in never)
        )
    if len(counted) < len(windows):
        notes.append(f"{len(windows) - len(counted)} window(s) of under {min_records:,.0f} records")
    if len(values) < 2:
        notes.append("needs 2 steady windows")
    note = "; ".join(notes) or "every window steady"
    if len(values) < 2:
        return Flatness(False, math.nan, math.nan, len(values), note)
    largest, median = max(values), statistics.median(values)
    return Flatness(not never and largest < factor * median, largest, median, len(values), note)


# -- resident set ----------------------------------------------------------------------


@dataclass(frozen=True)
class RssSample:
    at_s: float
    incarnation: int  # 1 for the role's first process, 2 after its first restart, ...
    mib: float
    steady: bool = True  # doing its steady work: an ingest process caught up with the load


def rss_level(
    samples: Sequence[RssSample],
    at_s: float,
    span_s: float = LEVEL_SPAN_S,
    lookback_s: float = WINDOW_MAX_S,
) -> float:
    """The resident set at ``at_s``: the median of one process's steady samples over
    ``span_s`` (one sample is noisy: a batch in flight, a collection not yet run), the
    latest process sampled steady within ``lookback_s`` before ``at_s``: a process still
    recovering from a crash is not at its level, its predecessor's last level stands for
    it. NaN when no process was steady within ``lookback_s`` (the worker never caught up
    then: its level is unknown, and the check that uses it is missed)."""
    steady = [s for s in samples if s.steady and at_s - lookback_s < s.at_s <= at_s + 1e-9]
    if not steady:
        return math.nan
    alive, last = steady[-1].incarnation, steady[-1].at_s
    recent = [s.mib for s in steady if s.incarnation == alive and s.at_s > last - span_s]
    return statistics.median(recent)


def rss_summary(
    samples: Sequence[RssSample], early_s: float, end_s: float, lookback_s: float = WINDOW_MAX_S
) -> dict[str, Any]:
    """start (first sample), early (level after the first minutes), max, end (level at the
    end), and how much the end is above the early level; the processes those levels are of
    (0: none was steady)."""
    if not samples:
        return {"start": math.nan, "early": math.nan, "max": math.nan, "end": math.nan}
    early = rss_level(samples, early_s, lookback_s=lookback_s)
    end = rss_level(samples, end_s, lookback_s=lookback_s)
    return {
        "start": samples[0].mib,
        "early": early,
        "early_at_min": early_s / 60,
        "early_incarnation": _alive(samples, early_s, lookback_s),
        "max": max(s.mib for s in samples),
        "end": end,
        "end_incarnation": _alive(samples, end_s, lookback_s),
        "growth_pct": 100 * (end / early - 1) if early > 0 else math.nan,
    }


def _alive(samples: Sequence[RssSample], at_s: float, lookback_s: float) -> int:
    """The process whose steady samples make the level at ``at_s`` (0: none)."""
    before = [s for s in samples if s.steady and at_s - lookback_s < s.at_s <= at_s + 1e-9]
    return before[-1].incarnation if before else 0


# -- acceptance -------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    check: str
    value: str
    rule: str
    met: bool

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.check, "value": self.value, "rule": self.rule, "met": self.met}


def acceptance(results: dict[str, Any]) -> list[Check]:
    """The soak's verdict, one check per line; ``results`` as ``run_soak`` builds them."""
    checks = []
    for role, rss in results["rss_mib"].items():
        early, end = rss["early"], rss["end"]
        known = math.isfinite(end) and math.isfinite(early)
        checks.append(
            Check(
                f"{role} process RSS at the end within 10% of its level at "
                f"{rss.get('early_at_min', 0):g} min",
                f"{end:,.1f} MiB vs {early:,.1f} MiB ({rss.get('growth_pct', math.nan):+.1f}%)"
                if known
                else "unknown: no process had caught up in the window before "
                + ("the end" if math.isfinite(early) else f"{rss.get('early_at_min', 0):g} min"),
                "end <= 1.10 x early",
                known and end <= (1 + RSS_GROWTH_LIMIT) * early,
            )
        )
    verify = results["verify"].get("end") or {}
    checks.append(
        Check(
            "verify at the end",
            "ok"
            if verify.get("ok")
            else f"{len(verify.get('violations', []))} check(s) failed"
            if verify
            else "not run",
            "ok",
            bool(verify.get("ok")),
        )
    )
    outbox = results["outbox_end"]
    age = outbox["oldest_unpublished_age_s"]
    checks.append(
        Check(
            "oldest unpublished outbox row at the end",
            f"{age:.1f} s ({outbox['unpublished']:,} unpublished)",
            f"< {OUTBOX_AGE_LIMIT_S:.0f} s",
            age < OUTBOX_AGE_LIMIT_S,
        )
    )
    flat = results["latency_flatness"]
    checks.append(
        Check(
            "steady p99 per window flat",
            f"max {flat['largest_ms']:,.0f} ms, median {flat['median_ms']:,.0f} ms "
            f"over {flat['windows']} windows ({flat['note']})",
            f"max < {FLAT_FACTOR:g} x median",
            flat["flat"],
        )
    )
    unasked = results["unexpected_exits"]
    checks.append(
        Check(
            "worker processes that exited unasked",
            f"{len(unasked)}" + (f": {'; '.join(unasked)}" if unasked else ""),
            "0 (and exit 0 on SIGTERM)",
            not unasked,
        )
    )
    return checks
