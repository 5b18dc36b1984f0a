"""structlog set-up: JSON lines in production, readable lines in a terminal.

Event names are stable (``batch_flushed``, ``dead_letter``, ...) so an operator can grep
for them; per-batch lines carry topic, partition and offsets.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from workers.settings import LogFormat, LogLevel


def configure_logging(level: LogLevel = "info", fmt: LogFormat = "json") -> None:
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    numeric_level = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Library loggers (aiokafka's rebalance notices, asyncpg) go to the same stream.
    logging.basicConfig(level=max(numeric_level, logging.WARNING), stream=sys.stderr, force=True)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
