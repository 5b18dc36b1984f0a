"""Settings a later step would trip on are refused at start-up, in one line naming the
variable (the start-up failures that are not settings name their cause too: see
tests/integration/test_cli.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tests.support import assert_one_line_error
from workers.settings import Settings

BAD_VALUES = [
    ("kafka_bootstrap_servers", "127.0.0.1:99999", "ports 1-65535"),
    ("kafka_bootstrap_servers", "127.0.0.1:0", "ports 1-65535"),
    ("kafka_bootstrap_servers", "kafka-1:9092,", "host:port"),
    ("topic_usage", "", "topic name"),
    ("topic_usage", "billing usage", "topic name"),
    ("topic_usage", "..", "topic name"),
    ("topic_usage", "t" * 250, "topic name"),
    ("topic_dlq", "billing/dlq", "topic name"),
    ("consumer_group", "", "without surrounding spaces"),
    ("consumer_group", " chargeline", "without surrounding spaces"),
    ("api_host", "", "without surrounding spaces"),
    ("stripe_api_base", "notaurl", "http:// or https://"),
    ("stripe_api_base", "ftp://127.0.0.1:12111", "http:// or https://"),
    ("stripe_api_base", "http://127.0.0.1:99999", "http:// or https://"),
    ("stripe_api_base", "http://", "http:// or https://"),
    ("metrics_port", "65536", "less than or equal to 65535"),
]


@pytest.mark.parametrize(("name", "value", "message"), BAD_VALUES)
def test_a_value_a_later_step_would_trip_on_is_refused(name: str, value: str, message: str) -> None:
    fields: dict[str, Any] = {name: value}
    with pytest.raises(ValidationError, match=message):
        Settings(**fields)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("kafka_bootstrap_servers", "kafka-1:9092,kafka-2:65535"),
        ("topic_usage", "Billing_usage-2.v1"),
        ("topic_usage", "t" * 249),
        ("consumer_group", "chargeline blue"),
        ("stripe_api_base", "http://127.0.0.1:12111"),
        ("stripe_api_base", "https://stripe.internal/"),
        ("api_host", "::"),
    ],
)
def test_legal_values_are_kept_as_given(name: str, value: str) -> None:
    fields: dict[str, Any] = {name: value}
    assert getattr(Settings(**fields), name) == value


def test_two_roles_cannot_share_a_topic() -> None:
    with pytest.raises(ValidationError, match="different names"):
        Settings(topic_alerts="billing.events", topic_payouts="billing.events")


def chargeline(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli.main", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_command_line_names_the_variable_in_one_line() -> None:
    done = chargeline("topics", "ensure", CHARGELINE_TOPIC_USAGE="billing usage")
    assert_one_line_error(done, code=2, mentions="CHARGELINE_TOPIC_USAGE: a topic name is")
    shared = chargeline("topics", "ensure", CHARGELINE_TOPIC_USAGE="billing.charges")
    assert_one_line_error(shared, code=2, mentions="invalid configuration: the five topics")


def test_metrics_ports_of_several_processes_must_all_exist() -> None:
    done = chargeline("worker", "--processes", "3", "all", CHARGELINE_METRICS_PORT="65534")
    assert_one_line_error(done, code=2, mentions="CHARGELINE_METRICS_PORT to 65533 or lower")


def test_the_api_names_its_busy_address_before_anything_else() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = chargeline(
            "api",
            CHARGELINE_API_HOST="127.0.0.1",
            CHARGELINE_API_PORT=str(port),
            CHARGELINE_LOG_FORMAT="console",
        )
    assert_one_line_error(done, code=1, mentions=f"cannot listen on 127.0.0.1:{port}")


def test_the_api_without_postgres_says_so_in_one_line() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        free = probe.getsockname()[1]
    done = chargeline(
        "api",
        CHARGELINE_API_HOST="127.0.0.1",
        CHARGELINE_API_PORT="0",
        CHARGELINE_DATABASE_URL=f"postgresql://chargeline@127.0.0.1:{free}/chargeline",
        CHARGELINE_LOG_FORMAT="console",
    )
    assert_one_line_error(
        done, code=1, mentions=f"cannot use Postgres at postgresql://chargeline@127.0.0.1:{free}"
    )


def test_a_timeout_at_start_up_says_so() -> None:
    """A Postgres that answers nothing raises a TimeoutError with no message of its own."""
    from workers.cli.main import _server_error

    message = _server_error(TimeoutError(), Settings())
    assert message == (
        "cannot use Postgres at postgresql://chargeline@127.0.0.1:5432/chargeline: "
        "no answer in time (timed out)"
    )


def test_an_unreachable_broker_is_one_line(tmp_path: Path) -> None:
    """Not the Kafka client's own lines besides it, nor a warning of a client left open."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        nobody = f"127.0.0.1:{probe.getsockname()[1]}"
    events = tmp_path / "one.jsonl"
    events.write_text(
        '{"type": "charge", "flow_id": "f", "customer_ref": "c", "reference": "r", '
        '"amount": 1, "currency": "EUR"}\n'
    )
    for args in (("publish", "billing.charges", str(events)), ("topics", "ensure")):
        done = chargeline(*args, CHARGELINE_KAFKA_BOOTSTRAP_SERVERS=nobody)
        assert_one_line_error(done, code=1, mentions=f"Kafka at {nobody}")
