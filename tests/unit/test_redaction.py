"""Secrets, API keys and card numbers never reach a log line.

The end-to-end tests run a small program in a subprocess (so that it owns its stderr and
its logging set-up) that sends secrets through every way a line is written: structlog
events (values, nested values, bound and context variables, the event text), exception
tracebacks, stdlib loggers of the libraries, asyncio's exception handler, and exceptions
nobody caught, in a thread and in the main program.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest
from aiokafka import TopicPartition

from workers.logs import CARD_MASK, MASK, is_secret_key, redact, redact_event, redact_text

REPO = Path(__file__).resolve().parents[2]

# Luhn-valid test numbers, written the ways people write them.
CARDS = [
    "4242424242424242",  # Visa
    "4000 0000 0000 0341",  # Visa, spaced
    "5555-5555-5555-4444",  # Mastercard, dashed
    "378282246310005",  # American Express (15 digits)
    "6011111111111117",  # Discover
    "3056930009020004",  # Diners (14 digits would also do)
    "2223003122003222",  # Mastercard 2-series
]
STRIPE_KEYS = [
    "sk_live_51HqLyjWDarjtT1zdp7dcXmplerHd8zBvT",
    "sk_test_4eC39HqLyjWDarjtT1zdp7dc",
    "rk_live_51HqLyjWDarjtT1zdp7dcRestricted",
    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
]
PASSWORD = "hunter2-Sup3r-s3cret"  # noqa: S105 -- the secret the test hunts for
DB_URL = f"postgresql://chargeline:{PASSWORD}@db.internal:5432/chargeline"
BEARER = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXRva2Vu.abcdef"


def _digits(card: str) -> str:
    return card.replace(" ", "").replace("-", "")


def leaks(output: str) -> list[str]:
    """Every secret of this module found in ``output``."""
    found = [card for card in CARDS if card in output or _digits(card) in output]
    found += [key for key in STRIPE_KEYS if key in output]
    found += [secret for secret in (PASSWORD, BEARER) if secret in output]
    return found


# --- the redaction itself -------------------------------------------------------------------


@pytest.mark.parametrize("card", CARDS)
def test_card_numbers_are_masked_in_text(card: str) -> None:
    assert redact_text(f"charge to {card} declined") == f"charge to {CARD_MASK} declined"
    assert redact_text(card) == CARD_MASK
    assert redact(int(_digits(card))) == CARD_MASK


@pytest.mark.parametrize(
    "text",
    [
        "4242424242424241",  # fails the Luhn check
        "offset 1732470000000 partition 3",  # epoch milliseconds (first digit 1)
        "2026-11-22T10:00:00Z",
        "550e8400-e29b-41d4-a716-446655440000",
        "tokens=5 remaining_tokens: 70 reload_tokens=100",
        "password authentication failed for user chargeline",
        "customer cust_42 used 30 tokens on feature image-gen",
        "sk_ is a prefix, pk_live_abc is a publishable key",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert redact_text(text) == text


@pytest.mark.parametrize("key", STRIPE_KEYS)
def test_stripe_keys_are_masked_keeping_their_kind(key: str) -> None:
    masked = redact_text(f"stripe said no to {key}.")
    assert key not in masked
    assert masked.startswith(f"stripe said no to {key.split('_', maxsplit=1)[0]}_")
    assert masked.endswith("[REDACTED].")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (DB_URL, "postgresql://chargeline:***@db.internal:5432/chargeline"),
        ("postgres://u:p@ss@h/db?sslmode=verify-full", "postgres://u:***@h/db?sslmode=verify-full"),
        (
            "cannot reach kafka://svc:pw@broker:9092 now",
            "cannot reach kafka://svc:***@broker:9092 now",
        ),
        (f"host=db password={PASSWORD} user=x", f"host=db password={MASK} user=x"),
        (
            f"{{'sasl_plain_password': '{PASSWORD}', 'n': 1}}",
            f"{{'sasl_plain_password': {MASK}, 'n': 1}}",
        ),
        (f'{{"api_key": "{PASSWORD}"}}', f'{{"api_key": {MASK}}}'),
        (f"Authorization: Bearer {BEARER}", f"Authorization: {MASK}"),
        (f"sent Bearer {BEARER} upstream", "sent Bearer [REDACTED] upstream"),
        ("postgresql://chargeline@db/chargeline", "postgresql://chargeline@db/chargeline"),
    ],
)
def test_passwords_in_urls_and_inline_secrets_are_masked(text: str, expected: str) -> None:
    assert redact_text(text) == expected


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("password", True),
        ("kafka_sasl_password", True),
        ("stripe_api_key", True),
        ("apiKey", True),
        ("X-API-Key", True),
        ("client_secret", True),
        ("access_token", True),
        ("Authorization", True),
        ("private_key", True),
        ("tokens", False),
        ("reload_tokens", False),
        ("customer_ref", False),
        ("key", False),
        ("database_url", False),  # its password is masked inside the URL instead
    ],
)
def test_secret_keys_are_recognised_by_name(key: str, secret: bool) -> None:
    assert is_secret_key(key) is secret


def test_nested_values_are_redacted_and_other_values_kept() -> None:
    event = {
        "event": f"charged {CARDS[0]}",
        "tokens": 30,
        "headers": {"Authorization": f"Bearer {BEARER}", "x-request-id": "r-1"},
        "attempts": [{"password": PASSWORD}, (CARDS[2], 7)],
        "raw": f"key={STRIPE_KEYS[0]}".encode(),
        "none_password": None,
        "offset": 1732470000000,
        "ratio": 0.5,
        "ok": True,
    }
    cleaned = redact({**event, "password": None})
    assert not leaks(repr(cleaned))
    assert cleaned["tokens"] == 30
    assert cleaned["headers"] == {"Authorization": MASK, "x-request-id": "r-1"}
    assert cleaned["attempts"] == [{"password": MASK}, (CARD_MASK, 7)]
    assert cleaned["offset"] == 1732470000000
    assert cleaned["password"] is None  # nothing to hide; "**********" would mislead
    assert (cleaned["ratio"], cleaned["ok"]) == (0.5, True)


def test_objects_are_judged_by_their_repr() -> None:
    class Opaque:
        def __repr__(self) -> str:
            return f"Opaque(dsn={DB_URL!r})"

    plain = object()
    assert redact(plain) is plain
    assert (
        redact(Opaque()) == "Opaque(dsn='postgresql://chargeline:***@db.internal:5432/chargeline')"
    )


def test_named_tuples_keep_their_type() -> None:
    partition = TopicPartition("billing.charges", 3)
    assert redact({"tp": partition})["tp"] == partition
    assert isinstance(redact(partition), TopicPartition)


def test_a_line_that_cannot_be_redacted_is_withheld_not_raised() -> None:
    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError(PASSWORD)

    line = redact_event(None, "info", {"event": "x", "level": "info", "obj": Broken()})
    assert line == {
        "event": "log_line_withheld",
        "reason": "redaction failed: RuntimeError",
        "level": "info",
        "timestamp": None,
    }


# --- every log path, end to end -------------------------------------------------------------

PROGRAM = """
import asyncio, logging, sys, threading
import structlog
from workers.logs import configure_logging, get_logger

CARDS, KEYS, PASSWORD, DB_URL, BEARER = {cards!r}, {keys!r}, {password!r}, {db_url!r}, {bearer!r}
configure_logging("debug", {fmt!r})
log = get_logger("chargeline.test")

# structlog: values, nested values, the event text, bound and context variables, levels
log.info(
    "charge_seen",
    card=CARDS[0],
    card_int=int(CARDS[3]),
    note=f"paid with {{CARDS[1]}} / {{CARDS[2]}}",
    database_url=DB_URL,
    stripe_api_key=KEYS[0],
    payload={{"password": PASSWORD, "nested": [CARDS[4], {{"token": BEARER}}]}},
    headers={{"Authorization": "Bearer " + BEARER}},
    raw=("webhook " + KEYS[3]).encode(),
    customer_ref="cust_visible",
    tokens=30,
)
log.debug(f"debug text with {{KEYS[1]}} and {{DB_URL}} and card {{CARDS[5]}}")
log.bind(kafka_sasl_password=PASSWORD, api_key=KEYS[2]).warning("bound_values")
structlog.contextvars.bind_contextvars(authorization="Bearer " + BEARER)
log.error("context_values", detail=f"sasl password={{PASSWORD}}")
structlog.contextvars.clear_contextvars()

# an exception with secrets in its message, logged with its traceback
try:
    raise ConnectionError(f"cannot connect to {{DB_URL}} charging {{CARDS[6]}} with {{KEYS[0]}}")
except ConnectionError:
    log.exception("retrying", component="postgres")

# stdlib loggers of the libraries, with %-arguments and with a traceback
logging.getLogger("aiokafka").warning("SASL login as %s password=%s", "svc", PASSWORD)
try:
    raise ValueError(f"stripe key {{KEYS[1]}} rejected for card {{CARDS[0]}}")
except ValueError:
    logging.getLogger("asyncpg").exception("library failure at %s", DB_URL)

# asyncio's handler for exceptions nobody retrieved (it logs through stdlib logging)
loop = asyncio.new_event_loop()
loop.call_exception_handler(
    {{"message": f"task failed {{CARDS[2]}}", "exception": RuntimeError(KEYS[3])}}
)
loop.close()

# an exception nobody caught, in a thread and then in the main program
def crash():
    raise RuntimeError(f"thread saw {{DB_URL}} {{CARDS[4]}}")

thread = threading.Thread(target=crash)
thread.start()
thread.join()
raise RuntimeError(f"fatal {{KEYS[0]}} password={{PASSWORD}} {{CARDS[1]}}")
"""


def _run(fmt: str) -> subprocess.CompletedProcess[str]:
    program = PROGRAM.format(
        cards=CARDS,
        keys=STRIPE_KEYS,
        password=PASSWORD,
        db_url=DB_URL,
        bearer=BEARER,
        fmt=fmt,
    )
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(program)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


EXPECTED_EVENTS = [
    "charge_seen",
    "debug text with",
    "bound_values",
    "context_values",
    "retrying",
    "SASL login as svc",
    "library failure at",
    "task failed",
    "unhandled_exception",
    "thread saw",
    "fatal sk_live_[REDACTED]",
]


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_no_secret_reaches_stderr_through_any_log_path(fmt: str) -> None:
    done = _run(fmt)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output  # the uncaught exception at the end
    for expected in EXPECTED_EVENTS:  # every line was written...
        assert expected in done.stderr, f"{expected!r} missing from:\n{done.stderr}"
    assert not leaks(output), f"leaked {leaks(output)} in:\n{output}"  # ...and none leaks
    assert "cust_visible" in done.stderr  # what is not secret stays readable
    assert "postgresql://chargeline:***@db.internal:5432/chargeline" in done.stderr
    assert CARD_MASK in done.stderr
    assert "Traceback" in done.stderr  # tracebacks are kept, only their secrets go
    if fmt == "json":
        # JSON in production: every line, the libraries' included, is one JSON object.
        for line in done.stderr.splitlines():
            assert isinstance(orjson.loads(line), dict), line
