"""Kafka SASL (SCRAM-SHA-256/512, PLAIN) and TLS settings, Postgres TLS in the URL.

What reaches aiokafka is checked by building its client from ``client_options``: it
validates the combination itself (a SASL_SSL client without an SSL context, or SCRAM with
no password, is refused there too).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import certifi
import pytest
from aiokafka.client import AIOKafkaClient
from pydantic import SecretStr, ValidationError

from workers.kafka import client_options
from workers.settings import SaslMechanism, SecurityProtocol, Settings

SASL_PASSWORD = "kafka-pa55word"  # noqa: S105 -- a made-up password to look for


def sasl_settings(protocol: SecurityProtocol, mechanism: SaslMechanism, **extra: Any) -> Settings:
    return Settings(
        kafka_bootstrap_servers="kafka-1:9093,kafka-2:9093",
        kafka_security_protocol=protocol,
        kafka_sasl_mechanism=mechanism,
        kafka_sasl_username="chargeline",
        kafka_sasl_password=SecretStr(SASL_PASSWORD),
        **extra,
    )


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"])
async def test_sasl_ssl_gives_aiokafka_sasl_credentials_and_a_verifying_tls_context(
    mechanism: SaslMechanism,
) -> None:
    settings = sasl_settings("SASL_SSL", mechanism, kafka_ssl_cafile=certifi.where())
    options = client_options(settings)
    context = options.pop("ssl_context")
    assert options == {
        "bootstrap_servers": "kafka-1:9093,kafka-2:9093",
        "security_protocol": "SASL_SSL",
        "request_timeout_ms": 40_000,
        "sasl_mechanism": mechanism,
        "sasl_plain_username": "chargeline",
        "sasl_plain_password": SASL_PASSWORD,
    }
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.get_ca_certs(), "the CA file was not loaded"
    client = AIOKafkaClient(**options, ssl_context=context)  # aiokafka accepts the set
    try:
        assert client._sasl_mechanism == mechanism
    finally:
        await client.close()


async def test_sasl_plaintext_has_no_tls_context() -> None:
    options = client_options(sasl_settings("SASL_PLAINTEXT", "SCRAM-SHA-256"))
    assert "ssl_context" not in options
    assert options["sasl_mechanism"] == "SCRAM-SHA-256"
    client = AIOKafkaClient(**options)
    await client.close()


def test_ssl_without_sasl_uses_the_system_trust_store_by_default() -> None:
    options = client_options(Settings(kafka_security_protocol="SSL"))
    assert options["security_protocol"] == "SSL"
    assert isinstance(options["ssl_context"], ssl.SSLContext)
    assert options["ssl_context"].verify_mode == ssl.CERT_REQUIRED
    assert not {"sasl_mechanism", "sasl_plain_username", "sasl_plain_password"} & options.keys()


def test_plaintext_is_just_the_servers_and_the_request_timeout() -> None:
    assert client_options(Settings(kafka_request_timeout_ms=5000)) == {
        "bootstrap_servers": "127.0.0.1:9092",
        "security_protocol": "PLAINTEXT",
        "request_timeout_ms": 5000,
    }


def test_a_missing_ca_file_fails_at_start_not_at_the_first_connection(tmp_path: Path) -> None:
    settings = sasl_settings(
        "SASL_SSL", "SCRAM-SHA-512", kafka_ssl_cafile=str(tmp_path / "missing.pem")
    )
    with pytest.raises(FileNotFoundError):
        client_options(settings)


@pytest.mark.parametrize("protocol", ["SASL_SSL", "SASL_PLAINTEXT"])
@pytest.mark.parametrize(
    "missing", ["kafka_sasl_mechanism", "kafka_sasl_username", "kafka_sasl_password"]
)
def test_incomplete_sasl_configuration_is_rejected(
    protocol: SecurityProtocol, missing: str
) -> None:
    fields: dict[str, Any] = {
        "kafka_security_protocol": protocol,
        "kafka_sasl_mechanism": "SCRAM-SHA-512",
        "kafka_sasl_username": "chargeline",
        "kafka_sasl_password": SecretStr(SASL_PASSWORD),
    }
    del fields[missing]
    with pytest.raises(ValidationError, match="SASL security protocol needs"):
        Settings(**fields)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("kafka_sasl_mechanism", "GSSAPI"),  # Kerberos: not offered
        ("kafka_sasl_mechanism", "scram-sha-512"),  # spelled as Kafka spells it, or not at all
        ("kafka_security_protocol", "TLS"),
    ],
)
def test_unknown_protocols_and_mechanisms_are_rejected(name: str, value: str) -> None:
    with pytest.raises(ValidationError):
        fields: dict[str, Any] = {name: value}
        Settings(**fields)


def test_security_settings_come_from_the_fixed_variable_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in {
        "CHARGELINE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "CHARGELINE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
        "CHARGELINE_KAFKA_SASL_USERNAME": "svc-chargeline",
        "CHARGELINE_KAFKA_SASL_PASSWORD": SASL_PASSWORD,
        "CHARGELINE_KAFKA_SSL_CAFILE": certifi.where(),
    }.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    options = client_options(settings)
    assert options["sasl_plain_username"] == "svc-chargeline"
    assert options["sasl_plain_password"] == SASL_PASSWORD
    # ...and the password never shows where settings are shown.
    assert SASL_PASSWORD not in repr(settings)
    assert SASL_PASSWORD not in str(settings.masked())
    assert settings.masked()["kafka_sasl_password"] == "*" * 10


def test_postgres_tls_travels_in_the_url_and_only_the_password_is_masked() -> None:
    url = (
        "postgresql://chargeline_runtime:pg-pa55@db.internal:5432/chargeline"
        "?sslmode=verify-full&sslrootcert=/etc/chargeline/tls/ca.pem"
    )
    settings = Settings(database_url=SecretStr(url))
    assert settings.dsn == url  # handed to asyncpg as is: it reads sslmode and sslrootcert
    assert settings.masked()["database_url"] == (
        "postgresql://chargeline_runtime:***@db.internal:5432/chargeline"
        "?sslmode=verify-full&sslrootcert=/etc/chargeline/tls/ca.pem"
    )
