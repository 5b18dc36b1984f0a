"""The kinds of worker a process can run (``chargeline worker KIND...``).

Apart from ``workers.app``, which composes them, so that naming them costs no import.
"""

from __future__ import annotations

INGEST_KINDS = ("charges", "usage")
"""Consume the input topics: one consumer, one group member, for all of them in a process."""
PERIODIC_KINDS = ("expiry", "reloads", "payouts", "webhooks", "monitor", "verify")
"""Loops beside ingestion, each on a pooled connection of its own."""
WORKER_KINDS = ("all", *INGEST_KINDS, "outbox", *PERIODIC_KINDS)
"""``all`` runs every kind but ``verify`` (one verify process is enough)."""
