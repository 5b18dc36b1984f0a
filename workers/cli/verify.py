"""``chargeline verify``: the invariants, checked against Postgres; exit 1 on a violation.

By default what came after the last passing run (and the checkpoint moved on);
``--full`` checks all history and moves nothing."""

from __future__ import annotations

import argparse
import sys

import orjson

from workers.cli.args import Parser, add_format, add_noun, positive_int
from workers.cli.database import connect
from workers.cli.output import to_json
from workers.jobs.verify import Report, verify, verify_recent
from workers.settings import Settings


def add_verify(nouns: argparse._SubParsersAction[Parser]) -> None:
    check = add_noun(nouns, "verify")
    check.add_argument("--limit", type=positive_int, default=20, help="rows shown per check")
    check.add_argument(
        "--full",
        action="store_true",
        help="check all history, not only what came after the last passing run's checkpoint"
        " (reads only: the checkpoint stays where it is)",
    )
    add_format(check, csv=False)
    check.set_defaults(run=verify_command)


async def verify_command(settings: Settings, args: argparse.Namespace) -> int:
    conn = await connect(settings)
    try:
        if args.full:
            report = await verify(conn, limit=args.limit)
        else:
            fence = await connect(settings)
            try:
                report = await verify_recent(conn, fence, limit=args.limit)
            finally:
                await fence.close()
    finally:
        await conn.close()
    if args.format == "json":
        sys.stdout.write(to_json(report.as_dict()) + "\n")
    else:
        for violation in report.violations:
            print(
                f"invariant {violation.invariant} ({violation.check}): {violation.description}"
                f" ({len(violation.rows)} row(s) shown)"
            )
            for row in violation.rows:
                print("  " + orjson.dumps(row, default=str).decode())
        verdict = "ok" if report.ok else f"{len(report.violations)} check(s) failed"
        print(
            f"verify: {verdict} ({report.checks} checks in {report.seconds:.2f}s; {_scope(report)})"
        )
    return 0 if report.ok else 1


def _scope(report: Report) -> str:
    scope = report.scope
    if scope is None:
        return "all history"
    covered = f"{scope.entries:,} ledger entries of {scope.customers:,} customers"
    if scope.since is None:
        return f"no checkpoint yet, so all history: {covered}"
    return f"since the checkpoint of {scope.since:%Y-%m-%d %H:%M:%S %Z}: {covered}"
