"""``chargeline publish TOPIC FILE``: validate every line of a JSONL file with the workers'
own models (line numbers for errors: nothing is published unless all are valid), then
publish them keyed by ``customer_ref``; ``--rate`` paces a backfill, progress on stderr."""

from __future__ import annotations

import argparse
from pathlib import Path

from workers.cli.args import Parser, add_format, add_noun, positive_int
from workers.cli.output import emit_object
from workers.cli.progress import ProgressDisplay
from workers.kafka import input_topics
from workers.ops.publish import publish_file
from workers.settings import Settings

PUBLISH_LINES_EVERY = 100_000


def add_publish(nouns: argparse._SubParsersAction[Parser]) -> None:
    publish = add_noun(nouns, "publish")
    publish.add_argument("topic", metavar="TOPIC")
    publish.add_argument("file", metavar="FILE")
    add_format(publish)
    publish.add_argument(
        "--rate",
        type=positive_int,
        metavar="N",
        help="publish at most N records per second (default: as fast as the broker takes them)",
    )
    publish.add_argument("--quiet", action="store_true", help="no progress on stderr")
    publish.set_defaults(run=publish_command)


async def publish_command(settings: Settings, args: argparse.Namespace) -> int:
    """``publish TOPIC FILE [--rate N] [--quiet]``: validate all, then publish, with progress."""
    with ProgressDisplay(quiet=args.quiet, every_n=PUBLISH_LINES_EVERY) as display:

        def progress(phase: str, done: int, total: int | None) -> None:
            display.update("validating" if phase == "validate" else "publishing", done, total)

        report = await publish_file(
            settings,
            input_topics(settings).get(args.topic, args.topic),
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
