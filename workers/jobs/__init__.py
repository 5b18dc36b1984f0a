"""Loops beside ingestion: the outbox relay and the periodic workers (expiry, reloads,
payouts, verify)."""
