"""``chargeline``: the command line.

Every command that prints data takes ``--format table|json[|csv]``. Errors are one line on
stderr and a non-zero exit: 2 for a command line or configuration that was not understood,
1 otherwise.

Each noun's parser is added by one function (``workers.cli.nouns``); only the noun on the
command line has its module imported, the others get a stub that carries their help. So
``chargeline --help`` imports nothing of the worker stack, and a command pays only for its
own imports.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from workers.cli.args import Parser
from workers.cli.nouns import NOUNS
from workers.errors import ChargelineError, ConfigurationError, UsageError

if TYPE_CHECKING:
    from workers.settings import Settings

Command = Callable[["Settings", argparse.Namespace], Coroutine[Any, Any, int]]
# Commands whose handlers import the worker stack (which logs) only when they run.
_IMPORTS_WHEN_RUN = ("worker", "dev", "bench", "soak", "api")


def build_parser(chosen: str | None = None) -> Parser:
    """The parser; with ``chosen``, that noun's full parser and a stub for every other one
    (``None``: every noun in full, for tests and documentation)."""
    root = Parser(prog="chargeline", description="Queue-driven charge processor.")
    nouns = root.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=Parser
    )
    for noun, (adder, help_text) in NOUNS.items():
        if chosen is None or noun == chosen:
            module, function = adder.split(":")
            getattr(importlib.import_module(module), function)(nouns)
        else:
            nouns.add_parser(noun, help=help_text, add_help=False)
    return root


def _chosen_noun(argv: Sequence[str]) -> str:
    """The first word that is not an option: the noun (the root takes no other option)."""
    return next((word for word in argv if not word.startswith("-")), "")


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(_chosen_noun(words)).parse_args(words)
        settings = _settings()
    except (UsageError, ConfigurationError) as exc:
        print(f"chargeline: error: {exc}", file=sys.stderr)
        return 2
    if args.command not in ("worker", "dev", "api"):
        settings = settings.model_copy(update={"log_format": "console", "log_level": "error"})
        # A command's failure is its one error line: the Kafka client's own account of a
        # broker it cannot reach would only repeat it, in more lines.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    # A command whose modules log has imported structlog by now, or imports them when it
    # runs; one that does neither (most reads) skips configuring it, and the import.
    if args.command in _IMPORTS_WHEN_RUN or "structlog" in sys.modules:
        from workers.logs import configure_logging

        configure_logging(settings.log_level, settings.log_format)
    run: Command = args.run
    # A long-running server may bring its own event loop (the API runs on uvloop).
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = getattr(
        args, "loop_factory", None
    )
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(run(settings, args))
    except KeyboardInterrupt:
        return 130
    except ChargelineError as exc:
        print(f"chargeline: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    except Exception as exc:
        message = _server_error(exc, settings)
        if message is None:
            raise
        print(f"chargeline: error: {message}", file=sys.stderr)
        return 1


def _settings() -> Settings:
    """The settings, or ConfigurationError naming every variable that is wrong, in one line."""
    from pydantic import ValidationError

    from workers.settings import Settings

    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            (f"CHARGELINE_{'_'.join(map(str, e['loc'])).upper()}: " if e["loc"] else "")
            + e["msg"].removeprefix("Value error, ")
            for e in exc.errors()
        )
        raise ConfigurationError(f"invalid configuration: {problems}") from None


def _server_error(exc: Exception, settings: Settings) -> str | None:
    """One line for a server the command could not use; None for anything else (a bug:
    its traceback is worth seeing)."""
    from workers.settings import mask_url

    # Only a module already imported can have raised: nothing is imported for the check.
    asyncpg = sys.modules.get("asyncpg")
    kafka_errors = sys.modules.get("aiokafka.errors")
    if asyncpg is not None and isinstance(exc, asyncpg.UndefinedTableError):
        return f"{exc} (run `chargeline migrate` first)"
    if isinstance(exc, OSError) or (
        asyncpg is not None
        and isinstance(exc, asyncpg.PostgresConnectionError | asyncpg.InvalidCatalogNameError)
    ):
        return f"cannot use Postgres at {mask_url(settings.dsn)}: {_reason(exc)}"
    if kafka_errors is not None and isinstance(exc, kafka_errors.KafkaError):
        return f"Kafka at {settings.kafka_bootstrap_servers}: {_reason(exc)}"
    return None


def _reason(exc: BaseException) -> str:
    """The exception's message; a timeout has none, so it says what it is."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return "no answer in time (timed out)"
    return str(exc) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
