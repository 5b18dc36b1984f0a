"""``chargeline replay``, ``chargeline dlq list|replay``, and the backfill options of
``chargeline publish`` (``--rate``, progress).

Registered through ``COMMAND_MODULES`` in ``main``. The ``replay`` report (SPEC.md section 8)
has ``read, applied, duplicates, conflicts, dead_letters``; dead letters have ``id, reason,
topic, partition, offset, detail``.

Long runs show progress on stderr: a progress bar on a terminal, otherwise a plain line every
few seconds (replay) or every 100,000 records (publish); ``--quiet`` turns it off. Stdout
carries only the report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncpg
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)

from workers import db
from workers.cli.args import Parser, positive_int, timestamp
from workers.cli.output import emit_object, emit_rows, to_json
from workers.errors import UsageError
from workers.kafka import input_topics
from workers.publish import publish_file
from workers.replay import (
    RETRYABLE_REASONS,
    RangeSpec,
    ReplayReport,
    replay_dead_letters,
    run_replay,
)
from workers.settings import Settings

DEAD_LETTER_COLUMNS = [
    "id",
    "reason",
    "topic",
    "partition",
    "offset",
    "detail",
    "created_at",
    "replayed_at",
]
PUBLISH_LINES_EVERY = 100_000
REPLAY_LINE_EVERY_S = 5.0


def register(nouns: argparse._SubParsersAction[Parser]) -> None:
    """Add ``replay`` and ``dlq list|replay``; add ``--rate`` and ``--quiet`` to ``publish``."""
    replay = nouns.add_parser(
        "replay",
        help="re-process a topic range through the live apply path; never moves the live "
        "group's offsets",
        description="Re-process a range of an input topic exactly as the live workers do. "
        "Start: --since, --from-offsets or the beginning; end: --until, --to-offsets or the "
        "log end when the replay starts. Times are record (publish) timestamps. Applied "
        "records count as duplicates: a replay is safe to repeat.",
    )
    replay.add_argument("--topic", required=True, help="an input topic (or: charges, usage)")
    replay.add_argument(
        "--since",
        type=timestamp,
        metavar="T",
        help="from the first record published at or after T (RFC 3339 or a date)",
    )
    replay.add_argument(
        "--until",
        type=timestamp,
        metavar="T",
        help="up to the first record published at or after T (RFC 3339 or a date)",
    )
    replay.add_argument(
        "--from-offsets",
        type=offsets,
        metavar="P:OFFSET,...",
        help="only these partitions, from these offsets (inclusive)",
    )
    replay.add_argument(
        "--to-offsets",
        type=offsets,
        metavar="P:OFFSET,...",
        help="stop before these offsets (exclusive); other partitions: the log end",
    )
    replay.add_argument(
        "--from-beginning", action="store_true", help="from the first offset (the default)"
    )
    replay.add_argument(
        "--dry-run",
        action="store_true",
        help="one transaction, rolled back: report what would change. It holds the rows it "
        "touches until it ends, so live batches for the same customers wait for it",
    )
    replay.add_argument(
        "--show", type=positive_int, default=100, help="rows shown per list in the report"
    )
    replay.add_argument("--quiet", action="store_true", help="no progress on stderr")
    replay.add_argument("--format", choices=("table", "json"), default="table")
    replay.set_defaults(run=replay_command)

    dlq = nouns.add_parser("dlq", help="dead letters").add_subparsers(
        dest="action", required=True, parser_class=Parser
    )
    dlist = dlq.add_parser("list", help="dead letters, newest first")
    dlist.add_argument("--reason")
    dlist.add_argument("--since", type=timestamp, metavar="T", help="recorded at or after T")
    dlist.add_argument("--replayed", choices=("yes", "no", "all"), default="all")
    dlist.add_argument("--limit", type=positive_int, default=100)
    _format(dlist, csv=True)
    dlist.set_defaults(run=dlq_list)
    dreplay = dlq.add_parser(
        "replay",
        help="re-publish dead letters to their source topic, once each",
        description="Re-publish dead letters not yet replayed (original key, bytes and "
        f"headers) to their source topic and mark them replayed. Default: the reasons a "
        f"retry can clear ({', '.join(RETRYABLE_REASONS)}). Charges whose flow is still "
        "paused or unknown are skipped and stay for a later run.",
    )
    which = dreplay.add_mutually_exclusive_group()
    which.add_argument("--reason", action="append", help="only this reason (repeatable)")
    which.add_argument("--ids", type=id_list, metavar="ID,...", help="only these dead letters")
    dreplay.add_argument("--since", type=timestamp, metavar="T", help="recorded at or after T")
    dreplay.add_argument(
        "--dry-run", action="store_true", help="show what would be replayed; publish nothing"
    )
    dreplay.add_argument("--format", choices=("table", "json"), default="table")
    dreplay.set_defaults(run=dlq_replay)

    publish = nouns.choices["publish"]
    publish.add_argument(
        "--rate",
        type=positive_int,
        metavar="N",
        help="publish at most N records per second (default: as fast as the broker takes them)",
    )
    publish.add_argument("--quiet", action="store_true", help="no progress on stderr")
    publish.set_defaults(run=publish_command)


def _format(parser: argparse.ArgumentParser, *, csv: bool = False) -> None:
    choices = ("table", "json", "csv") if csv else ("table", "json")
    parser.add_argument("--format", choices=choices, default="table", help="output format")


def offsets(text: str) -> dict[int, int]:
    """``0:100,1:250`` -> {0: 100, 1: 250}."""
    result: dict[int, int] = {}
    for part in text.split(","):
        partition, sep, offset = part.strip().partition(":")
        if not sep or not partition.isdigit() or not offset.isdigit():
            raise argparse.ArgumentTypeError(
                f"expected PARTITION:OFFSET[,PARTITION:OFFSET...] such as 0:100,1:250, got {text!r}"
            )
        if int(partition) in result:
            raise argparse.ArgumentTypeError(f"partition {partition} given twice in {text!r}")
        result[int(partition)] = int(offset)
    return result


def id_list(text: str) -> list[int]:
    """``1,2,3`` -> [1, 2, 3]."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"expected ids such as 1,2,3, got {text!r}")
    return sorted({int(part) for part in parts})


# --- progress ----------------------------------------------------------------------------------


class ProgressDisplay:
    """Progress on stderr: a rich bar on a terminal, else a line every ``every_s`` seconds or
    every ``every_n`` items. Quiet: nothing."""

    def __init__(
        self,
        *,
        quiet: bool,
        every_s: float | None = None,
        every_n: int | None = None,
    ) -> None:
        self.enabled = not quiet
        self.tty = self.enabled and sys.stderr.isatty()
        self.every_s = every_s
        self.every_n = every_n
        self.bar: Progress | None = None
        self.task: TaskID | None = None
        self.phase = ""
        self.phase_started = time.monotonic()
        self.last_time = time.monotonic()
        self.last_done = 0
        self.printed = False
        self.latest: tuple[int, int | None, str] = (0, None, "")

    def __enter__(self) -> ProgressDisplay:
        if self.tty:
            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self.bar.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif exc_type is None:
            self._flush()

    def update(self, phase: str, done: int, total: int | None, detail: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if phase != self.phase:
            self._flush()
            if self.bar is not None and self.task is not None:
                # The phase before is over: show it complete, also when its total was unknown.
                self.bar.update(self.task, total=self.latest[0], completed=self.latest[0])
            self.phase, self.phase_started = phase, now
            self.last_time, self.last_done, self.printed = now, 0, False
            if self.bar is not None:
                self.task = self.bar.add_task(phase, total=total, detail=detail)
        self.latest = (done, total, detail)
        if self.bar is not None:
            assert self.task is not None
            self.bar.update(self.task, completed=done, total=total, detail=detail)
            return
        due_n = self.every_n is not None and done - self.last_done >= self.every_n
        due_s = self.every_s is not None and now - self.last_time >= self.every_s
        if due_n or due_s:
            self._line(now)

    def _flush(self) -> None:
        """The last count of a phase that printed lines, unless it was the last line."""
        if self.bar is None and self.printed and self.latest[0] != self.last_done:
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        done, total, detail = self.latest
        self.last_time, self.last_done, self.printed = now, done, True
        rate = done / max(now - self.phase_started, 1e-9)
        of = f"/{total:,}" if total is not None else ""
        share = f" ({100 * done // total}%)" if total else ""
        extra = f", {detail}" if detail else ""
        print(
            f"{self.phase}: {done:,}{of} records{share}, {rate:,.0f}/s{extra}",
            file=sys.stderr,
            flush=True,
        )


@contextlib.contextmanager
def _stop_on_signals(stopping: asyncio.Event) -> Iterator[None]:
    """First SIGINT/SIGTERM: finish the batch in hand and stop; a second: stop at once."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stopping.is_set():
            loop.remove_signal_handler(signum)
            signal.raise_signal(signum)
            return
        print(
            "chargeline: stopping after the batch in hand (again to stop at once)",
            file=sys.stderr,
        )
        stopping.set()

    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, on_signal, signum)
            installed.append(signum)
    try:
        yield
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


# --- replay ------------------------------------------------------------------------------------


def _topic(settings: Settings, name: str) -> str:
    return input_topics(settings).get(name, name)


async def replay_command(settings: Settings, args: argparse.Namespace) -> int:
    """Re-process a range of an input topic; print the report."""
    if args.from_beginning and (args.since or args.from_offsets):
        raise UsageError("--from-beginning cannot be combined with --since or --from-offsets")
    if args.since and args.from_offsets:
        raise UsageError("give the start once: --since or --from-offsets")
    if args.until and args.to_offsets:
        raise UsageError("give the end once: --until or --to-offsets")
    spec = RangeSpec(
        since=args.since,
        until=args.until,
        from_offsets=args.from_offsets,
        to_offsets=args.to_offsets,
    )
    stopping = asyncio.Event()
    label = "replay (dry run)" if args.dry_run else "replay"
    with (
        ProgressDisplay(quiet=args.quiet, every_s=REPLAY_LINE_EVERY_S) as display,
        _stop_on_signals(stopping),
    ):

        def progress(done: int, total: int, report: ReplayReport) -> None:
            totals = report.outcomes()
            detail = (
                f"applied {totals['recorded']:,}, duplicates {totals['duplicate']:,}, "
                f"dead letters {report.new_dead_letters:,}"
            )
            display.update(label, done, total, detail)

        report = await run_replay(
            settings,
            _topic(settings, args.topic),
            spec,
            dry_run=args.dry_run,
            progress=progress,
            stopping=stopping,
        )
    document = report.as_dict(show=args.show)
    if args.format == "json":
        sys.stdout.write(to_json(document) + "\n")
    else:
        _replay_table(document)
    for warning in report.warnings:
        print(f"chargeline: warning: {warning}", file=sys.stderr)
    if not report.complete:
        print(
            "chargeline: replay interrupted before the end of its range; running the same "
            "command again is safe (what was applied counts as duplicates)",
            file=sys.stderr,
        )
        return 130
    return 0


def _replay_table(document: dict[str, Any]) -> None:
    title = "replay (dry run: nothing was changed)" if document["dry_run"] else "replay"
    summary = {
        key: value
        for key, value in document.items()
        if not isinstance(value, dict | list) or key == "dead_letters_by_reason"
    }
    emit_object(summary, "table", title=title)
    by_type = [{"type": event_type, **counts} for event_type, counts in document["by_type"].items()]
    if by_type:
        columns = ["type", "read", "applied", "duplicates", "conflicts", "invalid", "rejected"]
        emit_rows(by_type, "table", columns=columns, title="by type")
    emit_rows(
        document["partitions"],
        "table",
        columns=["partition", "start", "end", "read"],
        title="ranges read",
    )
    changes = document["changes"]
    verb = "would change" if document["dry_run"] else "changed"
    if changes["new_charges"]:
        emit_rows(
            changes["new_charges"],
            "table",
            columns=["flow_id", "currency", "count", "amount"],
            title=f"new charges ({verb})",
        )
    if changes["balance_changes"]:
        shown = len(changes["balance_changes"])
        more = f", {shown} of {changes['customers_changed']} shown" if shown < changes[
            "customers_changed"
        ] else ""  # fmt: skip
        emit_rows(
            changes["balance_changes"],
            "table",
            columns=["customer_ref", "before", "after", "change"],
            title=f"balances ({verb}{more})",
        )
    if changes["alerts"]:
        emit_rows(
            changes["alerts"],
            "table",
            columns=["customer_ref", "type", "previous_balance", "balance", "cause_reference"],
            title="alerts (would fire)" if document["dry_run"] else "alerts fired",
        )


# --- dead letters ------------------------------------------------------------------------------


async def dlq_list(settings: Settings, args: argparse.Namespace) -> int:
    """Dead letters, newest first; ``--replayed yes|no`` filters on ``replayed_at``."""
    replayed = {"yes": True, "no": False, "all": None}[args.replayed]
    conn: asyncpg.Connection = await asyncpg.connect(settings.dsn, timeout=10)
    try:
        rows = [
            db.record_to_dict(row)
            for row in await conn.fetch(
                db.QUERIES["dead_letter_list"], args.reason, args.since, args.limit, replayed
            )
        ]
    finally:
        await conn.close()
    emit_rows(rows, args.format, columns=DEAD_LETTER_COLUMNS, title="dead letters")
    return 0


async def dlq_replay(settings: Settings, args: argparse.Namespace) -> int:
    """Re-publish dead letters to their source topic, each at most once."""
    report = await replay_dead_letters(
        settings, reasons=args.reason, ids=args.ids, since=args.since, dry_run=args.dry_run
    )
    document = report.as_dict()
    if args.format == "json":
        sys.stdout.write(to_json(document) + "\n")
    else:
        title = "dead letters to replay (dry run)" if args.dry_run else "dead letters replayed"
        summary = {k: v for k, v in document.items() if k not in ("ids", "skipped")}
        emit_object(summary, "table", title=title)
        if report.skipped:
            emit_rows(
                report.skipped, "table", columns=["id", "reason", "why"], title="skipped (kept)"
            )
    if report.not_found:
        missing = ", ".join(map(str, report.not_found))
        print(f"chargeline: error: no dead letter with id {missing}", file=sys.stderr)
        return 1
    return 0


# --- publish -----------------------------------------------------------------------------------


async def publish_command(settings: Settings, args: argparse.Namespace) -> int:
    """``publish TOPIC FILE [--rate N] [--quiet]``: validate all, then publish, with progress."""
    with ProgressDisplay(quiet=args.quiet, every_n=PUBLISH_LINES_EVERY) as display:

        def progress(phase: str, done: int, total: int | None) -> None:
            display.update("validating" if phase == "validate" else "publishing", done, total)

        report = await publish_file(
            settings,
            _topic(settings, args.topic),
            Path(args.file),
            rate=args.rate,
            progress=progress,
        )
    emit_object(
        {
            "topic": report.topic,
            "file": report.file,
            "published": report.published,
            "by_type": report.by_type,
            "seconds": round(report.seconds, 3),
        },
        args.format,
        title="published",
    )
    return 0
