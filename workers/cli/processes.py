"""``chargeline worker``, ``dev``, ``bench`` and ``soak``: the commands that run processes.

The worker stack, the embedded servers and the bench and soak harnesses are imported by the
command that runs them, not when the parser is built.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from workers.cli.args import Parser, add_noun, positive_float, positive_int
from workers.errors import require_local_extra
from workers.kinds import WORKER_KINDS
from workers.settings import Settings


def add_worker(nouns: argparse._SubParsersAction[Parser]) -> None:
    worker = add_noun(nouns, "worker")
    worker.add_argument(
        "kinds",
        nargs="*",
        default=["all"],
        choices=WORKER_KINDS,
        metavar="KIND",
        help=f"one or more of {', '.join(WORKER_KINDS)}",
    )
    worker.add_argument(
        "--processes", type=positive_int, default=1, metavar="N",
        help="N processes on this host, one consumer-group member each: the first runs every "
        "kind given, the others their ingest kinds; metrics on CHARGELINE_METRICS_PORT + i",
    )  # fmt: skip
    worker.set_defaults(run=worker_command)


def add_dev(nouns: argparse._SubParsersAction[Parser]) -> None:
    dev = add_noun(nouns, "dev")
    dev.add_argument(
        "--keep-running",
        action="store_true",
        help="keep the stack and workers running after the demo (Ctrl-C stops)",
    )
    dev.set_defaults(run=dev_command)


def add_bench(nouns: argparse._SubParsersAction[Parser]) -> None:
    bench = add_noun(nouns, "bench")
    bench.add_argument("--events", type=positive_int, default=1_000_000)
    bench.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    bench.add_argument(
        "--fixed-rate-seconds", type=positive_float, default=20.0, metavar="S",
        help="length of the fixed-rate (latency) phase",
    )  # fmt: skip
    bench.add_argument(
        "--send-tick-ms", type=positive_float, metavar="MS",
        help="how often the fixed-rate load sends what is due, one batch per partition, "
        "each record stamped with the moment it fell due (default 20)",
    )  # fmt: skip
    bench.add_argument(
        "--naive-seconds", type=positive_float, default=10.0, metavar="S",
        help="length of each naive-baseline phase",
    )  # fmt: skip
    bench.add_argument(
        "--profile", type=Path, metavar="DIR",
        help="profile the drain (py-spy on the worker, pg_stat_statements, autovacuum) into DIR",
    )  # fmt: skip
    bench.set_defaults(run=bench_command)


def _minutes_or_zero(text: str) -> int:
    return 0 if text.strip() == "0" else positive_int(text)


def add_soak(nouns: argparse._SubParsersAction[Parser]) -> None:
    soak = add_noun(nouns, "soak")
    soak.add_argument("--minutes", type=positive_int, default=30, help="length of the load")
    soak.add_argument(
        "--rate", type=positive_float, metavar="EVENTS_PER_S",
        help="the load's rate (default: a quarter of the capacity measured first)",
    )  # fmt: skip
    soak.add_argument(
        "--crash-every-min", type=_minutes_or_zero, default=5, metavar="N",
        help="SIGKILL the ingest worker every N minutes (0: never)",
    )  # fmt: skip
    soak.add_argument(
        "--window-min", type=positive_int, metavar="N",
        help="latency window (default: the crash period, at most 5)",
    )  # fmt: skip
    soak.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    soak.set_defaults(run=soak_command)


async def worker_command(settings: Settings, args: argparse.Namespace) -> int:
    if args.processes > 1:
        from workers.supervisor import supervise

        return await supervise(settings, tuple(args.kinds), args.processes)
    from workers.app import WorkerProcess

    await WorkerProcess(settings, tuple(args.kinds)).run()
    return 0


async def dev_command(settings: Settings, args: argparse.Namespace) -> int:
    require_local_extra("dev")
    from workers.devtools.demo import run_dev

    return await run_dev(settings, keep_running=args.keep_running)


async def bench_command(settings: Settings, args: argparse.Namespace) -> int:
    require_local_extra("bench")
    from workers.devtools.bench import run_bench

    await run_bench(
        settings,
        events=args.events,
        json_path=args.json,
        fixed_rate_s=args.fixed_rate_seconds,
        send_tick_s=None if args.send_tick_ms is None else args.send_tick_ms / 1000,
        naive_s=args.naive_seconds,
        profile_dir=args.profile,
    )
    return 0


async def soak_command(settings: Settings, args: argparse.Namespace) -> int:
    require_local_extra("soak")
    from workers.devtools.soak import run_soak

    results = await run_soak(
        settings,
        minutes=args.minutes,
        rate=args.rate,
        crash_every_min=args.crash_every_min,
        window_min=args.window_min,
        json_path=args.json,
    )
    return 0 if results["ok"] else 1
