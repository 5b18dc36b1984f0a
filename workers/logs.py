"""structlog set-up: JSON lines in production, readable lines in a terminal.

Event names are stable (``batch_flushed``, ``dead_letter``, ...) so an operator can grep
for them; per-batch lines carry topic, partition and offsets.

Secrets and card data never reach a log line (SPEC.md section 10): :func:`redact` runs last
before rendering, on every value of every event, on exception text (after
``format_exc_info``), on the lines of library loggers (aiokafka, asyncpg) that go through
the stdlib ``logging`` module, and on tracebacks of exceptions nobody caught.
"""

from __future__ import annotations

import itertools
import logging
import re
import sys
import threading
from collections.abc import Callable, MutableMapping
from types import TracebackType
from typing import Any

import structlog

from workers.settings import LogFormat, LogLevel

MASK = "**********"
CARD_MASK = "[REDACTED CARD]"

# Keys whose value is a secret whatever it looks like. Matched on whole words of the key
# (`sasl_password`, `stripe_api_key`, `Authorization`), so `tokens` (a token *count*, all
# over the ledger) and `reload_tokens` are not secrets.
_SECRET_WORDS = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "secret",
        "token",
        "authorization",
        "apikey",
        "credential",
        "credentials",
        "cookie",
    }
)
_SECRET_WORD_PAIRS = frozenset({("api", "key"), ("private", "key"), ("access", "key")})
_KEY_WORDS = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")

# 13 to 19 digits, single spaces or dashes allowed between them (how card numbers are
# written). The first digit is 2-6: the major industry identifiers of payment cards (Visa 4,
# Mastercard 2 and 5, Amex, Diners and JCB 3, Discover and UnionPay 6). That leaves epoch
# milliseconds (1...) and most ids alone; the Luhn check below weeds out most of the rest.
_CARD_CANDIDATE = re.compile(r"(?<![0-9])[2-6](?:[ -]?[0-9]){12,18}(?![0-9])")
# Stripe secret and restricted keys, webhook signing secrets.
_STRIPE_KEY = re.compile(r"\b(sk_live_|sk_test_|rk_live_|rk_test_|whsec_)[0-9A-Za-z_]+")
# scheme://user:password@host -> scheme://user:***@host
_URL_PASSWORD = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/?#@]*):(?P<password>[^\s/?#]*)@"
)
# password=..., "api_key": "...", sasl_plain_password='...' inside free text (reprs, DSNs).
_INLINE_SECRET = re.compile(
    r"(?P<key>\b[A-Za-z0-9_.\-]*(?:password|passwd|secret|api[_\-]?key|token|authorization)"
    r"(?![A-Za-z0-9])[\"']?\s*[=:]\s*)"
    r"(?P<value>(?:(?:Bearer|Basic|Token)\s+)?(?:\"[^\"]*\"|'[^']*'|[^\s,;&)}\]]+))",
    re.IGNORECASE,
)
_BEARER = re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=\-]{8,}")


def is_secret_key(key: str) -> bool:
    """True for keys that name a secret: ``password``, ``kafka_sasl_password``, ``apiKey``..."""
    words = [word.lower() for word in _KEY_WORDS.findall(key)]
    if any(word in _SECRET_WORDS for word in words):
        return True
    return any(pair in _SECRET_WORD_PAIRS for pair in itertools.pairwise(words))


def _luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _mask_card(match: re.Match[str]) -> str:
    digits = re.sub(r"[ -]", "", match.group(0))
    return CARD_MASK if 13 <= len(digits) <= 19 and _luhn_valid(digits) else match.group(0)


def redact_text(text: str) -> str:
    """``text`` with card numbers, Stripe keys, URL passwords and inline secrets masked."""
    if not text:
        return text
    text = _URL_PASSWORD.sub(r"\g<head>:***@", text)
    text = _STRIPE_KEY.sub(r"\1[REDACTED]", text)
    text = _INLINE_SECRET.sub(lambda m: m.group("key") + MASK, text)
    text = _BEARER.sub(r"\1 [REDACTED]", text)
    return _CARD_CANDIDATE.sub(_mask_card, text)


def redact(value: Any, _depth: int = 0) -> Any:
    """``value`` with every secret masked, recursively through dicts, lists, tuples and sets.

    Objects of other types are left as they are unless their ``repr`` (what the renderers
    print) holds a secret; then the redacted ``repr`` replaces them.
    """
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, str):
        return redact_text(value)
    if _depth > 20:  # a self-referencing structure; the renderers would choke on it anyway
        return "[REDACTED: nested too deep]"
    if isinstance(value, dict):
        return {
            key: (
                MASK
                if isinstance(key, str) and is_secret_key(key) and item is not None
                else redact(item, _depth + 1)
            )
            for key, item in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return _redact_collection(value, _depth)
    return _redact_other(value)


def _redact_collection(value: Any, depth: int) -> Any:
    items = [redact(item, depth + 1) for item in value]
    if isinstance(value, list):
        return items
    if isinstance(value, tuple):
        # A named tuple (aiokafka's TopicPartition) keeps its type and field names.
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return type(value)(items)


def _redact_other(value: Any) -> Any:
    """Numbers, bytes and arbitrary objects: judged by the text a renderer would print."""
    if isinstance(value, int):
        text = str(value)
    elif isinstance(value, bytes | bytearray):
        text = value.decode("utf-8", "replace")
    else:
        text = repr(value)
    cleaned = redact_text(text)
    return value if cleaned == text else cleaned


def redact_event(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: :func:`redact` on the whole event; keep it just before rendering.

    Logging must never take a worker down, nor let a secret through when it fails: a line
    that cannot be redacted is replaced by one that says so.
    """
    try:
        cleaned: MutableMapping[str, Any] = redact(dict(event_dict))
    except Exception as exc:  # any failure here must still yield a safe line
        return {
            "event": "log_line_withheld",
            "reason": f"redaction failed: {type(exc).__name__}",
            "level": event_dict.get("level"),
            "timestamp": event_dict.get("timestamp"),
        }
    return cleaned


def _renderer(fmt: LogFormat) -> Any:
    if fmt == "json":
        return structlog.processors.JSONRenderer()
    return structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())


def configure_logging(level: LogLevel = "info", fmt: LogFormat = "json") -> None:
    numeric_level = logging.getLevelName(level.upper())
    renderer = _renderer(fmt)
    shared: list[Callable[..., Any]] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *shared,
            structlog.processors.StackInfoRenderer(),
            # Exceptions become text here, so that the redaction after it sees them.
            structlog.processors.format_exc_info,
            redact_event,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Library loggers (aiokafka's rebalance notices, asyncpg) go to the same stream, rendered
    # and redacted by the same processors as our own lines.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.StackInfoRenderer(),
                structlog.processors.format_exc_info,
                redact_event,
                renderer,
            ],
        )
    )
    logging.basicConfig(level=max(numeric_level, logging.WARNING), handlers=[handler], force=True)
    _install_excepthooks()


def _install_excepthooks() -> None:
    """Tracebacks of uncaught exceptions go through the redacting pipeline too."""

    def excepthook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, exc, tb)
            return
        structlog.get_logger("chargeline").critical("unhandled_exception", exc_info=(kind, exc, tb))

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is None or issubclass(args.exc_type, SystemExit):
            return
        structlog.get_logger("chargeline").critical(
            "unhandled_exception",
            thread=args.thread.name if args.thread is not None else None,
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        )

    # Only over the interpreter's defaults: a test runner's own hooks stay in place.
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = excepthook
    if threading.excepthook is threading.__excepthook__:
        threading.excepthook = thread_excepthook


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
