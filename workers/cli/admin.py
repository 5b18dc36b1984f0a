"""``chargeline migrate`` and ``chargeline topics ensure``: setting up the servers."""

from __future__ import annotations

import argparse
import sys

from workers import db
from workers.cli.args import Parser, add_actions, add_noun, positive_int
from workers.kafka import all_topics, ensure_topics, partition_counts
from workers.settings import Settings


def add_migrate(nouns: argparse._SubParsersAction[Parser]) -> None:
    add_noun(nouns, "migrate").set_defaults(run=migrate)


def add_topics(nouns: argparse._SubParsersAction[Parser]) -> None:
    ensure = add_actions(nouns, "topics").add_parser(
        "ensure", help="create the topics that are missing"
    )
    ensure.add_argument("--partitions", type=positive_int, help="partitions of new topics")
    ensure.add_argument("--replication-factor", type=positive_int)
    ensure.set_defaults(run=topics_ensure)


async def migrate(settings: Settings, args: argparse.Namespace) -> int:
    applied = await db.migrate(settings.dsn)
    print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))
    return 0


async def topics_ensure(settings: Settings, args: argparse.Namespace) -> int:
    created = await ensure_topics(settings, args.partitions, args.replication_factor)
    print(f"created {len(created)} topic(s)" + (f": {', '.join(created)}" if created else ""))
    wanted = args.partitions or settings.topic_partitions
    existing = [name for name in all_topics(settings) if name not in created]
    for name, count in sorted((await partition_counts(settings, existing)).items()):
        if count != wanted:
            # Not changed here: Kafka can only add partitions, and adding moves keys (a
            # customer's records) to other partitions, which breaks their order.
            print(
                f"chargeline: warning: {name} exists with {count} partitions, not {wanted}: "
                "left as it is",
                file=sys.stderr,
            )
    return 0
