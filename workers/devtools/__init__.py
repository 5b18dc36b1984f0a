"""For development only, never imported by a running worker: the embedded servers, the demo
of ``chargeline dev`` and the benchmark. Needs the ``local`` extra."""
