"""Every Prometheus metric chargeline exports, on one injected registry.

Workers receive a ``Metrics`` instance instead of touching module-level globals, so a test
can build its own registry and read exact counter values.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

BATCH_SIZE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Fine below a second: the end-to-end latency target (p99 < 500 ms) is read from these.
LAG_BUCKETS = (
    0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1,
    1.5, 2, 3, 5, 10, 30, 60, 300, 900, 3600,
)  # fmt: skip


class BatchHistogram(Collector):
    """A labelled histogram fed a batch of observations at a time.

    ``prometheus_client.Histogram`` takes one observation per call (a lock and a linear walk
    over the buckets each time): per record of a 5,000-record batch, that was a measurable
    share of the worker's CPU. Exposed exactly like a ``Histogram`` (``_bucket`` with
    ``le``, ``_sum``, ``_count``).
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        label: str,
        buckets: tuple[float, ...],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.bounds = tuple(sorted(buckets))
        # Per label value: a count per bucket (the last is +Inf), and the sum.
        self.counts: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}
        registry.register(self)

    def observe_many(self, value: str, observations: Iterable[float]) -> None:
        counts = self.counts.get(value)
        if counts is None:
            counts = self.counts[value] = [0] * (len(self.bounds) + 1)
            self.sums[value] = 0.0
        # Sorted once (in C), then one bisection per bucket rather than one per observation.
        ordered = sorted(observations)
        counted = 0
        for bucket, bound in enumerate(self.bounds):
            upto = bisect_right(ordered, bound, counted)  # le is inclusive
            counts[bucket] += upto - counted
            counted = upto
        counts[-1] += len(ordered) - counted
        self.sums[value] += sum(ordered)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, counts in self.counts.items():
            cumulative, running = [], 0
            for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
                running += count
                cumulative.append((_format_bound(bound), running))
            family.add_metric([value], cumulative, self.sums[value])
        yield family

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=[self.label])


def _format_bound(bound: float) -> str:
    # As prometheus_client.Histogram writes its ``le`` labels.
    return str(floatToGoString(bound))  # type: ignore[no-untyped-call]


class Metrics:
    """The metrics of one process. Names are ``chargeline_*`` (SPEC.md section 10)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "chargeline_events",
            "Input events by topic, type and outcome "
            "(recorded, duplicate, conflict, invalid, rejected).",
            ["topic", "type", "outcome"],
            registry=r,
        )
        self.dead_letters = Counter(
            "chargeline_dead_letters", "Dead letters recorded, by reason.", ["reason"], registry=r
        )
        # Exported from the start at 0, so that the first one is an increase an alert sees.
        self.dead_letters.labels(reason="unprocessable")
        self.isolations = Counter(
            "chargeline_lane_isolations",
            "Lane transactions that failed on their records and were applied again in pieces "
            "to dead-letter the records to blame, by topic.",
            ["topic"],
            registry=r,
        )
        self.stalled_lanes = Gauge(
            "chargeline_stalled_lanes",
            "Lanes holding records not committed for longer than "
            "CHARGELINE_LANE_STALL_TIMEOUT_S while Postgres answers.",
            ["worker"],
            registry=r,
        )
        self.batch_size = Histogram(
            "chargeline_batch_size",
            "Records per applied batch.",
            ["worker"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_duration = Histogram(
            "chargeline_batch_duration_seconds",
            "Time to apply one batch: parse, database transaction, offset commit.",
            ["worker"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.event_lag = BatchHistogram(
            "chargeline_event_lag_seconds",
            "Database commit time minus the record's timestamp.",
            "topic",
            LAG_BUCKETS,
            r,
        )
        self.consumer_fetch_lag = Gauge(
            "chargeline_consumer_fetch_lag",
            "Records between this worker's position and the high watermark of its last fetch "
            "(its own view: frozen when it stops fetching).",
            ["topic", "partition"],
            registry=r,
        )
        # The lag monitor's (workers/jobs/monitor.py): the broker's view, from outside.
        self.consumer_lag = Gauge(
            "chargeline_consumer_lag",
            "Records between the partition's log end and the group's committed offset.",
            ["topic", "partition"],
            registry=r,
        )
        self.consumer_log_end_offset = Gauge(
            "chargeline_consumer_log_end_offset",
            "The partition's log end, as the lag monitor last read it from the broker.",
            ["topic", "partition"],
            registry=r,
        )
        self.consumer_committed_offset = Gauge(
            "chargeline_consumer_committed_offset",
            "The group's committed offset, as the lag monitor last read it from the broker.",
            ["topic", "partition"],
            registry=r,
        )
        self.consumer_stalled = Gauge(
            "chargeline_consumer_stalled",
            "1 while the partition has lag and the group's committed offset has not moved for "
            "CHARGELINE_MONITOR_STALL_S.",
            ["topic", "partition"],
            registry=r,
        )
        self.retries = Counter(
            "chargeline_retries",
            "Retries after infrastructure failures, by component (postgres, kafka, stripe).",
            ["component"],
            registry=r,
        )
        self.outbox_published = Counter(
            "chargeline_outbox_published",
            "Outbox rows published to Kafka, by kind.",
            ["kind"],
            registry=r,
        )
        self.outbox_pruned = Counter(
            "chargeline_outbox_pruned",
            "Published outbox rows removed once older than CHARGELINE_OUTBOX_RETENTION_S.",
            registry=r,
        )
        self.outbox_depth = Gauge(
            "chargeline_outbox_depth", "Outbox rows not yet published.", registry=r
        )
        self.outbox_oldest_age = Gauge(
            "chargeline_outbox_oldest_age_seconds",
            "Age of the oldest unpublished outbox row (0 when empty).",
            registry=r,
        )
        self.alerts = Counter(
            "chargeline_alerts", "Alerts written to the outbox, by type.", ["type"], registry=r
        )
        self.reloads = Counter(
            "chargeline_reloads",
            "Reloads and top-ups finished, by result (succeeded, failed, disabled).",
            ["result"],
            registry=r,
        )
        self.stripe_request_seconds = Histogram(
            "chargeline_stripe_request_seconds",
            "Latency of Stripe API calls.",
            ["call"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.stripe_errors = Counter(
            "chargeline_stripe_errors",
            "Stripe API calls that raised, by call and error class.",
            ["call", "error"],
            registry=r,
        )
        self.stripe_webhook_events = Counter(
            "chargeline_stripe_webhook_events",
            "Stripe's events at the webhook endpoint (recorded, duplicate, bad_signature, "
            "...) and as the reloads worker handled them, by type (unhandled types: other).",
            ["type", "outcome"],
            registry=r,
        )
        self.verify_violations = Gauge(
            "chargeline_verify_violations",
            "Rows breaking each invariant of SPEC section 9 at the last verify (0: none).",
            ["invariant"],
            registry=r,
        )
        self.verify_last_run = Gauge(
            "chargeline_verify_last_run_timestamp_seconds",
            "When verify last completed (Unix time).",
            registry=r,
        )
        self.verify_duration = Gauge(
            "chargeline_verify_duration_seconds",
            "How long the last verify took (from taking its snapshot to its verdict).",
            registry=r,
        )
        self.verify_entries = Gauge(
            "chargeline_verify_entries_checked",
            "Ledger entries the last verify checked: those after the previous checkpoint.",
            registry=r,
        )
        self.ready = Gauge(
            "chargeline_worker_ready",
            "1 when the worker's consumer is assigned and its database reachable.",
            ["worker"],
            registry=r,
        )
        # --- the HTTP API ---
        self.http_requests = Counter(
            "chargeline_http_requests",
            "HTTP API requests by route template, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_request_duration = Histogram(
            "chargeline_http_request_duration_seconds",
            "Time to answer an HTTP API request, by route template.",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        # --- payouts ---
        self.payouts = Counter(
            "chargeline_payouts",
            "Payouts closed by this process's payouts worker, by currency.",
            ["currency"],
            registry=r,
        )
        self.payout_amount = Counter(
            "chargeline_payout_amount",
            "Amount paid out in closed payouts, in the currency's minor units, by currency.",
            ["currency"],
            registry=r,
        )
        self.charges_awaiting_payout = Gauge(
            "chargeline_charges_awaiting_payout",
            "Recorded charges not yet in a payout.",
            registry=r,
        )
        self.oldest_unpaid_charge_age = Gauge(
            "chargeline_oldest_unpaid_charge_age_seconds",
            "Age (since recorded_at) of the oldest charge not yet in a payout (0 when none).",
            registry=r,
        )
        # --- outbound webhooks ---
        self.webhook_deliveries = Counter(
            "chargeline_webhook_deliveries",
            "Webhook delivery attempts by endpoint id and result (succeeded; retried: not a "
            "2xx, tried again later; failed: not a 2xx and no retry left).",
            ["endpoint", "result"],
            registry=r,
        )
        self.webhook_delivery_lag = Histogram(
            "chargeline_webhook_delivery_lag_seconds",
            "From the alert's commit (its outbox row) to its successful delivery.",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.webhook_pending = Gauge(
            "chargeline_webhook_pending",
            "Webhook deliveries pending (not yet succeeded or failed), every endpoint.",
            registry=r,
        )
        self.webhook_oldest_pending = Gauge(
            "chargeline_webhook_oldest_pending_seconds",
            "Per endpoint, how long its oldest pending delivery has waited since its alert "
            "was committed (absent when nothing is pending).",
            ["endpoint"],
            registry=r,
        )
        self.webhook_last_success = Gauge(
            "chargeline_webhook_last_success_timestamp_seconds",
            "When this process last delivered to each endpoint (Unix time).",
            ["endpoint"],
            registry=r,
        )
