"""``chargeline``: the command line (SPEC.md section 8).

Every command that prints data takes ``--format table|json|csv``. Errors are one line on
stderr and a non-zero exit: 2 for a command line that was not understood, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from workers.cli import commands, customers, ledger, payouts, replay
from workers.cli.args import Parser, identifier, positive_float, positive_int, timestamp
from workers.errors import ChargelineError, UsageError
from workers.logs import configure_logging
from workers.settings import Settings, mask_url

Command = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]

# Modules that add command groups: each has `register(nouns)`, adding its subparsers with
# `set_defaults(run=<async (settings, args) -> exit code>)`. One line per module.
COMMAND_MODULES: list[Any] = [ledger, payouts, customers, replay]


def _format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format", choices=("table", "json", "csv"), default="table", help="output format"
    )


def build_parser() -> Parser:  # noqa: PLR0915 -- a parser is a long flat list
    root = Parser(prog="chargeline", description="Queue-driven charge processor.")
    nouns = root.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=Parser
    )

    nouns.add_parser("migrate", help="apply the Postgres schema migrations").set_defaults(
        run=commands.migrate
    )

    topics = nouns.add_parser("topics", help="Kafka topics").add_subparsers(
        dest="action", required=True, parser_class=Parser
    )
    ensure = topics.add_parser("ensure", help="create the topics that are missing")
    ensure.add_argument("--partitions", type=positive_int, help="partitions of new topics")
    ensure.add_argument("--replication-factor", type=positive_int)
    ensure.set_defaults(run=commands.topics_ensure)

    worker = nouns.add_parser("worker", help="run workers until SIGTERM, draining cleanly")
    worker.add_argument(
        "kinds",
        nargs="*",
        default=["all"],
        choices=commands.WORKER_KINDS,
        metavar="KIND",
        help=f"one or more of {', '.join(commands.WORKER_KINDS)}",
    )
    worker.set_defaults(run=commands.worker)

    dev = nouns.add_parser("dev", help="embedded stack, workers and a demo load, with a summary")
    dev.add_argument(
        "--keep-running",
        action="store_true",
        help="keep the stack and workers running after the demo (Ctrl-C stops)",
    )
    dev.set_defaults(run=commands.dev)

    flows = nouns.add_parser("flows", help="flows group charges").add_subparsers(
        dest="action", required=True, parser_class=Parser
    )
    create = flows.add_parser("create", help="create a flow")
    create.add_argument("flow_id", type=identifier, metavar="ID")
    create.add_argument("--name", required=True)
    create.add_argument("--payee", type=identifier, default="default")
    _format(create)
    create.set_defaults(run=commands.flows_create)
    listing = flows.add_parser("list", help="flows with status, last charge time and counts")
    _format(listing)
    listing.set_defaults(run=commands.flows_list)
    for action in ("pause", "resume"):
        sub = flows.add_parser(action, help=f"{action} a flow")
        sub.add_argument("flow_id", type=identifier, metavar="ID")
        _format(sub)
        sub.set_defaults(run=commands.flows_set_status, status=action)

    charges = nouns.add_parser("charges", help="recorded charges").add_subparsers(
        dest="action", required=True, parser_class=Parser
    )
    clist = charges.add_parser("list", help="charges, newest first")
    clist.add_argument("--flow", type=identifier)
    clist.add_argument("--customer", type=identifier)
    clist.add_argument("--status", choices=("recorded", "paid_out"))
    clist.add_argument("--since", type=timestamp, help="recorded at or after (RFC 3339 or date)")
    clist.add_argument("--until", type=timestamp, help="recorded before (RFC 3339 or date)")
    clist.add_argument("--limit", type=positive_int, default=100)
    _format(clist)
    clist.set_defaults(run=commands.charges_list)
    cshow = charges.add_parser("show", help="one charge, by id or reference")
    cshow.add_argument("charge", metavar="ID|REFERENCE")
    cshow.add_argument("--flow", type=identifier, help="the flow, when showing by reference")
    _format(cshow)
    cshow.set_defaults(run=commands.charges_show)

    publish = nouns.add_parser("publish", help="validate and publish events from a JSONL file")
    publish.add_argument("topic", metavar="TOPIC")
    publish.add_argument("file", metavar="FILE")
    _format(publish)
    publish.set_defaults(run=commands.publish)

    check = nouns.add_parser("verify", help="check the invariants; exit 1 on any violation")
    check.add_argument("--limit", type=positive_int, default=20, help="rows shown per check")
    check.add_argument("--format", choices=("table", "json"), default="table")
    check.set_defaults(run=commands.verify)

    bench = nouns.add_parser("bench", help="measure throughput, limits and latency here")
    bench.add_argument("--events", type=positive_int, default=1_000_000)
    bench.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    bench.add_argument(
        "--fixed-rate-seconds", type=positive_float, default=20.0, metavar="S",
        help="length of the fixed-rate (latency) phase",
    )  # fmt: skip
    bench.add_argument(
        "--naive-seconds", type=positive_float, default=10.0, metavar="S",
        help="length of each naive-baseline phase",
    )  # fmt: skip
    bench.add_argument(
        "--profile", type=Path, metavar="DIR",
        help="profile the drain (py-spy on the worker, pg_stat_statements, autovacuum) into DIR",
    )  # fmt: skip
    bench.set_defaults(run=commands.bench)

    for module in COMMAND_MODULES:
        module.register(nouns)
    return root


def main(argv: Sequence[str] | None = None) -> int:  # noqa: PLR0911 -- one exit per error kind
    try:
        args = build_parser().parse_args(argv)
        settings = Settings()
    except UsageError as exc:
        print(f"chargeline: error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        problems = "; ".join(
            f"CHARGELINE_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()
        )
        print(f"chargeline: error: invalid configuration: {problems}", file=sys.stderr)
        return 2
    if args.command not in ("worker", "dev"):
        settings = settings.model_copy(update={"log_format": "console", "log_level": "error"})
    configure_logging(settings.log_level, settings.log_format)
    run: Command = args.run
    try:
        return asyncio.run(run(settings, args))
    except KeyboardInterrupt:
        return 130
    except ChargelineError as exc:
        print(f"chargeline: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    except (OSError, asyncpg.PostgresConnectionError, asyncpg.InvalidCatalogNameError) as exc:
        print(
            f"chargeline: error: cannot use Postgres at {mask_url(settings.dsn)}: {exc}",
            file=sys.stderr,
        )
        return 1
    except KafkaError as exc:
        print(
            f"chargeline: error: Kafka at {settings.kafka_bootstrap_servers}: {exc}",
            file=sys.stderr,
        )
        return 1
    except asyncpg.UndefinedTableError as exc:
        print(f"chargeline: error: {exc} (run `chargeline migrate` first)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
