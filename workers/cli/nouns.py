"""The nouns of ``chargeline``, in the order ``chargeline --help`` lists them: for each, the
function that adds its parser and its one-line help.

``main`` imports only the module of the noun on the command line, so that a command (and
``--help``) pays for its own imports and no other's: the worker stack, the embedded servers
and the bench stay unloaded unless asked for.
"""

from __future__ import annotations

from typing import NamedTuple


class Noun(NamedTuple):
    adder: str  # "module:function", called with the root's subparsers
    help: str


NOUNS: dict[str, Noun] = {
    "migrate": Noun("workers.cli.admin:add_migrate", "apply the Postgres schema migrations"),
    "topics": Noun("workers.cli.admin:add_topics", "Kafka topics"),
    "worker": Noun(
        "workers.cli.processes:add_worker", "run workers until SIGTERM, draining cleanly"
    ),
    "dev": Noun(
        "workers.cli.processes:add_dev", "embedded stack, workers and a demo load, with a summary"
    ),
    "flows": Noun("workers.cli.flows:add_flows", "flows group charges"),
    "charges": Noun("workers.cli.charges:add_charges", "recorded charges"),
    "balances": Noun(
        "workers.cli.ledger:add_balances",
        "token balances, grants with remaining and expiry, alert state",
    ),
    "usage": Noun(
        "workers.cli.ledger:add_usage", "tokens used per period (UTC) and feature, over a range"
    ),
    "customers": Noun("workers.cli.customers:add_customers", "customer billing settings"),
    "credits": Noun("workers.cli.customers:add_credits", "prepaid credits"),
    "payouts": Noun("workers.cli.payouts:add_payouts", "payouts per payee and currency"),
    "payees": Noun("workers.cli.payouts:add_payees", "who charges are paid out to"),
    "publish": Noun(
        "workers.cli.publish:add_publish", "validate and publish events from a JSONL file"
    ),
    "replay": Noun(
        "workers.cli.replay:add_replay",
        "re-process a topic range through the live apply path; never moves the live "
        "group's offsets",
    ),
    "dlq": Noun("workers.cli.dlq:add_dlq", "dead letters"),
    "api": Noun("workers.cli.api:add_api", "the HTTP API until SIGTERM"),
    "api-keys": Noun("workers.cli.api:add_api_keys", "keys of the HTTP API, with their scopes"),
    "webhooks": Noun(
        "workers.cli.webhooks:add_webhooks", "HTTP endpoints the alerts are delivered to, signed"
    ),
    "verify": Noun(
        "workers.cli.verify:add_verify", "check the invariants; exit 1 on any violation"
    ),
    "bench": Noun("workers.cli.processes:add_bench", "measure throughput, limits and latency here"),
    "soak": Noun(
        "workers.cli.processes:add_soak",
        "a long run at a fixed rate with worker crashes: memory, latency, outbox, verify",
    ),
}
