"""The HTTP API (``chargeline api``): events onto the topics, reads from Postgres, keys with
scopes. It writes nothing a worker owns."""
