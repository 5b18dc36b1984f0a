"""``chargeline replay``: re-process a range of an input topic through the live apply path.

The report (the contract's fields) has ``read, applied, duplicates, conflicts,
dead_letters``, with what changed. A long replay shows progress on stderr
(``workers.cli.progress``).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from datetime import datetime
from typing import Any

from workers.cli.args import Parser, add_format, add_noun, positive_int, timestamp
from workers.cli.output import emit_object, emit_rows, to_json
from workers.cli.progress import ProgressDisplay, stop_on_signals
from workers.errors import UsageError
from workers.kafka import input_topics
from workers.ops.replay import ReplayReport, run_replay
from workers.ops.topic_ranges import RangeSpec
from workers.settings import Settings

REPLAY_LINE_EVERY_S = 5.0


def add_replay(nouns: argparse._SubParsersAction[Parser]) -> None:
    replay = add_noun(
        nouns,
        "replay",
        description="Re-process a range of an input topic exactly as the live workers do. "
        "Start: --since, --from-offsets or the beginning; end: --until, --to-offsets or the "
        "log end when the replay starts. Times are record (publish) timestamps. Applied "
        "records count as duplicates: a replay is safe to repeat.",
    )
    replay.add_argument("--topic", required=True, help="an input topic (or: charges, usage)")
    replay.add_argument(
        "--since",
        type=time_or_offsets,
        metavar="T",
        help="from the first record published at or after T (RFC 3339 or a date), or from "
        "offsets, as --from-offsets",
    )
    replay.add_argument(
        "--until",
        type=time_or_offsets,
        metavar="T",
        help="up to the first record published at or after T (RFC 3339 or a date), or up to "
        "offsets, as --to-offsets",
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
    add_format(replay, csv=False)
    replay.set_defaults(run=replay_command)


def time_or_offsets(text: str) -> datetime | dict[int, int]:
    """A time (RFC 3339 or a date) or offsets (``0:100,1:250``): the contract's
    ``--since/--until`` take either; no time is made of digits, colons and commas alone."""
    if re.fullmatch(r"[0-9:, ]+", text):
        return offsets(text)
    return timestamp(text)


def offsets(text: str) -> dict[int, int]:
    """``0:100,1:250`` -> {0: 100, 1: 250}."""
    result: dict[int, int] = {}
    for part in text.split(","):
        partition, sep, offset = part.strip().partition(":")
        digits = partition.isascii() and offset.isascii()
        if not sep or not digits or not partition.isdigit() or not offset.isdigit():
            raise argparse.ArgumentTypeError(
                f"expected PARTITION:OFFSET[,PARTITION:OFFSET...] such as 0:100,1:250, got {text!r}"
            )
        if int(partition) in result:
            raise argparse.ArgumentTypeError(f"partition {partition} given twice in {text!r}")
        result[int(partition)] = int(offset)
    return result


def _topic(settings: Settings, name: str) -> str:
    return input_topics(settings).get(name, name)


async def replay_command(settings: Settings, args: argparse.Namespace) -> int:
    """Re-process a range of an input topic; print the report."""
    # --since and --until take times or offsets: offsets are --from- and --to-offsets.
    for bound, twin in (("since", "from_offsets"), ("until", "to_offsets")):
        if isinstance(getattr(args, bound), dict):
            if getattr(args, twin) is not None:
                raise UsageError(f"give the {'start' if bound == 'since' else 'end'} once")
            setattr(args, twin, getattr(args, bound))
            setattr(args, bound, None)
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
        stop_on_signals(stopping),
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
