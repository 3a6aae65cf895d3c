"""The ingest stages, in the order they run; each reads one manifest and writes the next."""

STAGES = ("download", "split", "caption", "score")
