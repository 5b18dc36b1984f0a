"""Operator actions: publishing files of events, replaying topic ranges and dead letters."""
