"""The HTTP API (``chargeline api``): events onto the topics, reads from Postgres, keys with
scopes. It writes nothing a worker owns."""

# The routes' paths use the {name:id} convertor, registered on import of this module.
from workers.api import segments as segments
