"""Ingestion: records from the input topics, parsed, deduplicated and applied in lane
transactions, dead letters for what cannot be, offsets committed after the database."""
