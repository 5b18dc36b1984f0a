"""``chargeline dlq list|replay``: dead letters by reason, and their re-publication to the
source topic, once each. Dead letters have ``id, reason, topic, partition, offset, detail``.
"""

from __future__ import annotations

import argparse
import sys

from workers import db
from workers.cli.args import (
    MAX_BIGINT,
    Parser,
    add_actions,
    add_format,
    dead_letter_reason,
    positive_int,
    timestamp,
)
from workers.cli.database import connect
from workers.cli.output import emit_object, emit_rows, to_json
from workers.ops.dlq_replay import RETRYABLE_REASONS, replay_dead_letters
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


def add_dlq(nouns: argparse._SubParsersAction[Parser]) -> None:
    dlq = add_actions(nouns, "dlq")
    dlist = dlq.add_parser("list", help="dead letters, newest first")
    dlist.add_argument("--reason", type=dead_letter_reason)
    dlist.add_argument("--since", type=timestamp, metavar="T", help="recorded at or after T")
    dlist.add_argument("--replayed", choices=("yes", "no", "all"), default="all")
    dlist.add_argument("--limit", type=positive_int, default=100)
    add_format(dlist)
    dlist.set_defaults(run=dlq_list)
    dreplay = dlq.add_parser(
        "replay",
        help="re-publish dead letters to their source topic, once each",
        description="Re-publish dead letters not yet replayed (original key, bytes and "
        f"headers) to their source topic and mark them replayed. Default: the reasons a "
        f"retry can clear ({', '.join(RETRYABLE_REASONS)}). Charges whose flow is still "
        "paused or unknown, and voids whose grant is still missing, are skipped and stay for a "
        "later run.",
    )
    which = dreplay.add_mutually_exclusive_group()
    which.add_argument(
        "--reason", type=dead_letter_reason, action="append", help="only this reason (repeatable)"
    )
    which.add_argument("--ids", type=id_list, metavar="ID,...", help="only these dead letters")
    dreplay.add_argument("--since", type=timestamp, metavar="T", help="recorded at or after T")
    dreplay.add_argument(
        "--dry-run", action="store_true", help="show what would be replayed; publish nothing"
    )
    add_format(dreplay, csv=False)
    dreplay.set_defaults(run=dlq_replay)


def id_list(text: str) -> list[int]:
    """``1,2,3`` -> [1, 2, 3]."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isascii() and part.isdigit() and 0 < int(part) <= MAX_BIGINT for part in parts):
        raise argparse.ArgumentTypeError(f"expected ids such as 1,2,3, got {text!r}")
    return sorted({int(part) for part in parts})


async def dlq_list(settings: Settings, args: argparse.Namespace) -> int:
    """Dead letters, newest first; ``--replayed yes|no`` filters on ``replayed_at``."""
    replayed = {"yes": True, "no": False, "all": None}[args.replayed]
    conn = await connect(settings)
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
