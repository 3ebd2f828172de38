"""The HTTP ingest API (``POST /v1/episodes``), its bearer tokens and its durable hand-off."""
