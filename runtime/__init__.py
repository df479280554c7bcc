"""Ponder runtime: the model, checkpoints, and the engine that serves them (docs/architecture.md)."""
