"""One settings class for every process: environment variables prefixed ``CHARGELINE_``.

The names in SPEC.md section 11 are fixed (deployments depend on them); the tuning knobs
below them are ours and listed in deploy/README.md. What the algorithm depends on (manual offset
commits, read-committed isolation of the consumer) is hard-coded where it is used, not
exposed here.
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LogFormat = Literal["json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]

MAX_PORT = 65_535
TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")


class Settings(BaseSettings):
    """Configuration of a chargeline process; every field is ``CHARGELINE_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix="CHARGELINE_",
        case_sensitive=False,
        extra="ignore",
        validate_default=True,
    )

    # --- servers (names fixed by SPEC.md section 11) ---
    database_url: SecretStr = Field(
        default=SecretStr("postgresql://chargeline@127.0.0.1:5432/chargeline"),
        description="postgresql://... of the system of record.",
    )
    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:9092", description="host:port[,host:port]"
    )
    kafka_security_protocol: SecurityProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: SaslMechanism | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: str | None = None
    kafka_idempotent_producer: bool = Field(
        default=True,
        description="Producer idempotence; on for Apache Kafka, off for brokers that lack "
        "InitProducerId (the embedded Tansu broker).",
    )

    topic_charges: str = "billing.charges"
    topic_usage: str = "billing.usage"
    topic_alerts: str = "billing.alerts"
    topic_payouts: str = "billing.payouts"
    topic_dlq: str = "billing.dlq"
    topic_partitions: int = Field(default=6, ge=1, description="Partitions for `topics ensure`.")
    topic_replication_factor: int = Field(default=1, ge=1)

    consumer_group: str = "chargeline"
    kafka_session_timeout_ms: int = Field(
        default=10_000,
        ge=1000,
        description="How long the group waits for a silent member before moving its partitions.",
    )
    kafka_request_timeout_ms: int = Field(
        default=40_000,
        ge=1000,
        le=600_000,
        description="How long a request to the broker may wait for its answer before the "
        "client gives up on it (and chargeline retries); aiokafka's default.",
    )
    kafka_fetch_max_wait_ms: int = Field(
        default=100,
        ge=1,
        le=30_000,
        description="Longest a fetch may wait for records; bounds latency on quiet partitions.",
    )

    stripe_api_key: SecretStr = SecretStr("sk_test_chargeline")
    stripe_api_base: str | None = None
    stripe_timeout_s: float = Field(default=30.0, gt=0, description="Per Stripe API call.")
    stripe_webhook_secret: SecretStr | None = Field(
        default=None,
        description="The signing secret (whsec_...) of the endpoint Stripe sends events to "
        "(POST /v1/stripe/webhooks); without it the endpoint answers 503.",
    )

    metrics_port: int = Field(default=9464, ge=0, le=MAX_PORT, description="0 disables /metrics.")
    metrics_host: str = "0.0.0.0"  # noqa: S104 -- a worker's metrics must be scrapable from outside its pod.
    api_host: str = Field(
        default="0.0.0.0",  # noqa: S104 -- the API serves other hosts: that is its job.
        description="Address `chargeline api` listens on.",
    )
    api_port: int = Field(default=8080, ge=0, le=MAX_PORT, description="Port of the HTTP API.")
    api_max_batch_bytes: int = Field(
        default=8 << 20,
        ge=65_536,
        description="Largest body of POST /v1/events; a single charge's limit is "
        "CHARGELINE_MAX_EVENT_BYTES.",
    )
    log_level: LogLevel = "info"
    log_format: LogFormat = "json"

    # --- batching and back-off ---
    batch_max_records: int = Field(default=4000, ge=1, le=100_000)
    batch_max_bytes: int = Field(
        default=16 << 20,
        ge=1 << 20,
        description="A batch stops gathering once its record values reach this many bytes, "
        "whatever batch_max_records says: a worker holds a few batches, so large records "
        "cannot take its memory past a few times this.",
    )
    batch_max_wait_ms: int = Field(default=100, ge=1, le=60_000)
    batch_linger_ms: int = Field(
        default=50,
        ge=0,
        le=10_000,
        description="Once a fetch has returned records, how long to go on gathering more, up "
        "to batch_max_records, before applying them: under light load, fewer and larger "
        "transactions for at most this much latency; 0 applies each fetch as it comes.",
    )
    batches_in_flight: int = Field(
        default=2,
        ge=1,
        le=8,
        description="Batches being applied while the next one is fetched and parsed; memory "
        "holds one more than this.",
    )
    batch_lanes: int = Field(
        default=3,
        ge=1,
        le=16,
        description="Transactions per topic a batch is split into, by partition; they run "
        "concurrently so that Postgres works on one while the worker computes another.",
    )
    max_event_bytes: int = Field(
        default=65_536, ge=1024, description="Records larger than this are dead-lettered."
    )
    lane_stall_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="A lane holding records that has not committed for this long while "
        "Postgres answers is reported stalled (log, metric, /readyz).",
    )
    retry_initial_ms: int = Field(default=200, ge=1)
    retry_max_ms: int = Field(default=10_000, ge=1)
    outbox_batch_size: int = Field(default=1000, ge=1)
    outbox_poll_ms: int = Field(default=50, ge=1)
    outbox_retention_s: float = Field(
        default=3 * 86_400.0,
        gt=0,
        description="How long a published outbox row is kept before the relay removes it "
        "(unpublished rows are never removed).",
    )
    shutdown_timeout_s: float = Field(default=30.0, gt=0)
    failpoint: str | None = Field(
        default=None,
        description="Fault injection for the fault tests only: `crash_before_db_commit:N` or "
        "`crash_after_db_commit:N` SIGKILLs the worker at that point of every Nth batch.",
        pattern=r"^(crash_before_db_commit|crash_after_db_commit):[1-9][0-9]*$",
    )
    expiry_interval_s: float = Field(
        default=1.0,
        gt=0,
        description="How often the expiry worker looks for due grants: how long a grant past "
        "its expiry (or before its start) can still be read as it was, for a customer with "
        "no traffic.",
    )
    expiry_batch_size: int = Field(default=500, ge=1)
    reload_interval_s: float = Field(
        default=1.0, gt=0, description="How often the reloads worker looks for requests."
    )
    reload_lease_s: float = Field(
        default=120.0,
        gt=0,
        description="How long a claimed reload is left alone before another worker retries it.",
    )
    verify_interval_s: float = Field(
        default=300.0, gt=0, description="How often the verify worker checks the invariants."
    )
    monitor_interval_s: float = Field(
        default=15.0,
        gt=0,
        description="How often the lag monitor reads log ends and the "
        "group's committed offsets from the broker.",
    )
    monitor_stall_s: float = Field(
        default=300.0,
        gt=0,
        description="How long a partition may have lag while the group's committed offset "
        "stays put before the lag monitor calls it stalled.",
    )

    # --- payouts ---
    payout_period: Literal["hourly", "daily"] = Field(
        default="hourly", description="Length of a payout period; periods end on UTC boundaries."
    )
    payout_grace_s: float = Field(
        default=60.0,
        ge=0,
        description="Delay after a period's end before the payouts worker closes it, so charges "
        "still being recorded at the boundary land in their own period.",
    )
    payout_interval_s: float = Field(
        default=30.0,
        gt=0,
        description="How often the payouts worker looks for a period to close and for payouts "
        "to send to Stripe.",
    )

    # --- outbound webhooks (the `webhooks` worker) ---
    webhook_retry_schedule_s: str = Field(
        default="5,300,1800,7200,18000,36000,36000",
        description="Seconds before each retry of a webhook delivery that did not get a 2xx "
        "(comma-separated); once they are used up the delivery is failed.",
    )
    webhook_timeout_s: float = Field(
        default=10.0, gt=0, le=300, description="Per webhook request, connection included."
    )
    webhook_concurrency: int = Field(
        default=32, ge=1, le=1000, description="Webhook requests in flight per worker process."
    )
    webhook_endpoint_concurrency: int = Field(
        default=4,
        ge=1,
        le=100,
        description="Webhook requests in flight per endpoint, across every worker.",
    )
    webhook_poll_interval_s: float = Field(
        default=0.5,
        gt=0,
        le=60,
        description="How often the webhooks worker looks for new alerts and due deliveries.",
    )

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _servers_are_host_port(cls, value: str) -> str:
        for server in value.split(","):
            host, sep, port = server.strip().rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) <= MAX_PORT:
                raise ValueError(
                    f"expected host:port[,host:port] with ports 1-65535, got {value!r}"
                )
        return value

    @field_validator("topic_charges", "topic_usage", "topic_alerts", "topic_payouts", "topic_dlq")
    @classmethod
    def _topic_is_legal(cls, value: str) -> str:
        # Kafka's own rule: a broker refuses any other name, and `topics ensure` would only
        # say so topic by topic, after the others were created.
        if not TOPIC_NAME.fullmatch(value) or value in {".", ".."}:
            raise ValueError(
                f"a topic name is 1-249 of the characters a-z A-Z 0-9 . _ -, got {value!r}"
            )
        return value

    @field_validator("consumer_group", "metrics_host", "api_host")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip() or value != value.strip():
            raise ValueError(f"expected a name without surrounding spaces, got {value!r}")
        return value

    @field_validator("stripe_api_base")
    @classmethod
    def _api_base_is_http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        url = urlsplit(value)
        try:
            port = url.port  # raises for a port out of range or not a number
        except ValueError:
            port = -1
        if url.scheme not in {"http", "https"} or not url.hostname or port == -1:
            raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url_is_postgres(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().startswith(("postgresql://", "postgres://")):
            raise ValueError("expected a postgresql:// URL")
        return value

    @field_validator("webhook_retry_schedule_s")
    @classmethod
    def _schedule_is_seconds(cls, value: str) -> str:
        parse_schedule(value)
        return value

    @model_validator(mode="after")
    def _sasl_is_complete(self) -> Settings:
        if self.kafka_security_protocol.startswith("SASL") and not (
            self.kafka_sasl_mechanism and self.kafka_sasl_username and self.kafka_sasl_password
        ):
            raise ValueError(
                "SASL security protocol needs KAFKA_SASL_MECHANISM, _USERNAME and _PASSWORD"
            )
        topics = [self.topic_charges, self.topic_usage, self.topic_alerts]
        topics += [self.topic_payouts, self.topic_dlq]
        if len(set(topics)) < len(topics):
            raise ValueError(f"the five topics must have different names, got {topics}")
        if self.retry_max_ms < self.retry_initial_ms:
            raise ValueError("retry_max_ms must be >= retry_initial_ms")
        return self

    def as_env(self) -> dict[str, str]:
        """These settings as CHARGELINE_* variables, secrets in clear: the environment of a
        child process (a worker the benchmark or a test starts) that must see the same."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                text = value.get_secret_value()
            elif isinstance(value, bool):
                text = "true" if value else "false"
            else:
                text = str(value)
            env[f"CHARGELINE_{name.upper()}"] = text
        return env

    @property
    def webhook_retry_delays(self) -> tuple[float, ...]:
        """CHARGELINE_WEBHOOK_RETRY_SCHEDULE_S as seconds, one per retry."""
        return parse_schedule(self.webhook_retry_schedule_s)

    @property
    def dsn(self) -> str:
        return self.database_url.get_secret_value()

    def masked(self) -> dict[str, object]:
        """Every setting with secrets (and the password inside the database URL) masked."""
        shown: dict[str, object] = {}
        for name, value in self.model_dump().items():
            if isinstance(value, SecretStr):
                text = value.get_secret_value()
                shown[name] = mask_url(text) if name == "database_url" else "**********"
            else:
                shown[name] = value
        return shown


def mask_url(url: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, hostpart = rest.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{hostpart}" if ":" in userinfo else url


def parse_schedule(text: str) -> tuple[float, ...]:
    """``5,300,1800`` -> (5.0, 300.0, 1800.0): at least one delay, each 0 to 7 days."""
    try:
        delays = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"expected seconds separated by commas, got {text!r}") from None
    if not all(0 <= delay <= 7 * 86_400 for delay in delays):
        raise ValueError(f"every delay should be 0 to 604800 seconds, got {text!r}")
    return delays
