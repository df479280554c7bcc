"""Ponder runtime: the model, checkpoints and (later) the engine that serves them."""
