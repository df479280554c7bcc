"""Ponder server: the OpenAI-compatible HTTP API, Prometheus metrics and `ponder serve` (docs/architecture.md)."""
